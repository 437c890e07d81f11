"""Worker for tests/test_sft.py: run the SFT entry point inside a spawned rank."""


def run_sft(rank: int, world: int, argv: list[str]) -> None:
    from megatron_rl.train.sft import main

    main(argv)
