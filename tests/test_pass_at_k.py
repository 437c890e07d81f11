"""Unbiased pass@k vs brute-force enumeration of every k-subset of the n samples."""

import itertools
import math

import pytest

from megatron_rl.train.pass_at_k import default_ks, mean_pass_at_k, pass_at_k, pass_at_k_by_split


def brute(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute(n, c, k), abs=1e-12)


def test_large_n_is_stable():
    got = pass_at_k(1000, 3, 100)
    exp = 1 - math.comb(997, 100) / math.comb(1000, 100)
    assert got == pytest.approx(exp, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_default_ks_and_splits():
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    correct = {"id": [[True, False, False, False], [False] * 4, [True, True, False, True]],
               "ood": [[False, True], [False, False, True]]}
    out = pass_at_k_by_split(correct)
    for k in (1, 2, 4):
        exp = (brute(4, 1, k) + brute(4, 0, k) + brute(4, 3, k)) / 3
        assert out[f"id/pass@{k}"] == pytest.approx(exp)
    assert set(out) == {"id/pass@1", "id/pass@2", "id/pass@4", "ood/pass@1", "ood/pass@2"}
    assert out["ood/pass@1"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert mean_pass_at_k([]) == {}
