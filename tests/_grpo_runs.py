"""Worker for tests/test_grpo.py: run the GRPO entry point inside a spawned rank."""


def parity_verifier(response: str, label: str) -> float:
    """A reward the untrained tiny model earns about half the time (the synthetic task's exact
    match is ~never right before SFT), so advantages and gradients are non-zero."""
    return float(len(response) % 2 == 0)


def run_grpo(rank: int, world: int, argv: list[str]) -> dict:
    from megatron_rl.train.grpo import main

    return main(argv, verifier=parity_verifier)


def digit_verifier(response: str, label: str) -> float:
    """Dense reward the untrained tiny model can climb: the fraction of non-space characters that
    are digits (every group has reward variance, so every step has a learning signal)."""
    chars = [c for c in response if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def run_grpo_digits(rank: int, world: int, argv: list[str]) -> dict:
    from megatron_rl.train.grpo import main

    return main(argv, verifier=digit_verifier)
