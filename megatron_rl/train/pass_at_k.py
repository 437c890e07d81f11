"""Unbiased pass@k (Chen et al. 2021, "Evaluating large language models trained on code",
arXiv 2107.03374, sec. 2.1 and fig. 3): with n samples of which c are correct,
``pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (the product form never
forms large binomials). Per problem, then averaged per split. Pure Python (no torch).
"""

from __future__ import annotations

from typing import Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem.

    Args: n samples, c correct (0 <= c <= n), k in [1, n].
    Returns: probability in [0, 1] that at least one of k samples drawn without replacement is
        correct.
    Raises: ValueError for counts out of range.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def default_ks(n: int) -> list[int]:
    """Powers of two up to n, plus n itself: n=6 -> [1, 2, 4, 6]."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def mean_pass_at_k(counts: Sequence[tuple[int, int]],
                   ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over problems given as (n, c) pairs.

    Args: counts: per problem (samples n, correct c); ks: default ``default_ks(min n)``.
    Returns: {k: mean over problems}; {} when there are no problems.
    Raises: ValueError when some k exceeds a problem's n.
    """
    if not counts:
        return {}
    ks = default_ks(min(n for n, _ in counts)) if ks is None else list(ks)
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def pass_at_k_by_split(correct: Mapping[str, Sequence[Sequence[bool]]],
                       ks: Sequence[int] | None = None) -> dict[str, float]:
    """pass@k per evaluation split.

    Args: correct: split name -> per problem, the correctness of each of its samples (problems
        may have different n); ks: as ``mean_pass_at_k`` (default per split).
    Returns: flat metrics ``{"<split>/pass@<k>": value}`` (logger-ready).
    """
    out = {}
    for split, problems in correct.items():
        counts = [(len(s), sum(bool(x) for x in s)) for s in problems]
        for k, v in mean_pass_at_k(counts, ks).items():
            out[f"{split}/pass@{k}"] = v
    return out
