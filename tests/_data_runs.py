"""Workers / verifiers for tests/test_datasets.py and tests/test_logging.py (imported by name in
spawned ranks and through ``--verifier _data_runs:metric_verifier``)."""


def metric_verifier(response: str, label: str) -> dict:
    """The parity reward of tests/_grpo_runs.py plus two metrics: ``even`` (== the reward, so its
    step mean must equal rollout/reward_mean) and ``chars`` (response length in characters)."""
    r = float(len(response) % 2 == 0)
    return {"reward": r, "even": r, "chars": float(len(response))}


def run_grpo_flags(rank: int, world: int, argv: list[str]) -> dict:
    """The GRPO entry point with the verifier the flags name (no Python-side verifier)."""
    from megatron_rl.train.grpo import main

    return main(argv)
