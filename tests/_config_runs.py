"""Worker for tests/test_config.py: the SFT entry point in a spawned rank, recording the config
warnings it raises (the resume diff)."""


def run_sft_warnings(rank: int, world: int, argv: list[str]) -> list[str]:
    import warnings

    from megatron_rl.train.run_config import ConfigChangedWarning
    from megatron_rl.train.sft import main

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", ConfigChangedWarning)
        main(argv)
    return [str(w.message) for w in rec if issubclass(w.category, ConfigChangedWarning)]
