"""LoadBalance modes (megatron_rl/moe/balance.py), each against an independent reference:

- "micro": the accumulated router gradient of a DP=2 x 4 uneven-micro-batch step equals a float64
  autograd of mean_b L_b (Switch LBL of each micro-batch, arXiv 2501.11873) computed from the
  router inputs captured in a full-batch forward;
- expert bias (DeepSeek-V3 sec. 2.1.2): the update equals the float64 formula on counts of a
  reference top-k over captured inputs, and the DP=2 update equals the world-1 full-batch one;
- "off": the router load metrics equal ``router_load_metrics`` of the reference counts."""

import pytest
import torch

from megatron_rl.moe import LoadBalance, expert_bias_update, router_load_metrics
from megatron_rl.testing import run_distributed

from _lbl_runs import SEQ, VALID, make_rows, run_balance

ALPHA, TOPK, E, RATE = 1e-2, 2, 8, 1e-3
TOL = 1e-6  # relative to the largest reference gradient entry


def _valid_rows() -> torch.Tensor:
    """[S, 8] bool validity of the 8 rows (seq-first like the captured router inputs)."""
    return torch.stack([r["loss_mask"] for r in make_rows(384)]).t() > 0


def _route(scores: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(scores).scatter_(1, scores.topk(TOPK, -1).indices, 1.0)


def reference_micro_grad(x, w, valid):
    """float64 dL/dW of L = mean_b alpha E sum_i f^b_i P^b_i, one row per micro-batch.
    x [S*8, H] seq-first, w [E, H], valid [S, 8]."""
    w = w.clone().requires_grad_(True)
    xs = x.view(SEQ, valid.shape[1], -1)
    losses = []
    for b in range(valid.shape[1]):
        v = valid[:, b].double()[:, None]
        logits = xs[:, b] @ w.t()
        p = torch.softmax(logits, -1)
        n = v.sum()
        f = (_route(logits) * v).sum(0) / (TOPK * n)
        losses.append(ALPHA * E * (f * (p * v).sum(0) / n).sum())
    torch.stack(losses).mean().backward()
    return w.grad


def reference_bias_counts(x, w, bias, valid):
    """[E] float64 counts of valid tokens routed by top-k of sigmoid(x W^T) + bias."""
    scores = torch.sigmoid(x @ w.t()) + bias
    return (_route(scores) * valid.reshape(-1).double()[:, None]).sum(0)


@pytest.fixture(scope="module")
def dp2(tiny_hf_dir):
    specs = [{"mode": "micro", "capture": True}, {"mode": "off", "given_counts": True}]
    return run_distributed(run_balance, 2, tiny_hf_dir, specs, ALPHA)


def test_micro_dp2_uneven_matches_per_microbatch_reference(dp2):
    valid = _valid_rows()
    cap = dp2[0][0]
    layers = sorted(cap["inputs"])
    ref = {i: reference_micro_grad(cap["inputs"][i], cap["weights"][i], valid) for i in layers}
    assert min(ref[i].abs().max() for i in layers) > 1e-6  # non-vacuous
    err = max(((rank[0]["grads"][i] - ref[i]).abs().max() / ref[i].abs().max()).item()
              for rank in dp2 for i in layers)
    off = max(rank[1]["grads"][i].abs().max().item() for rank in dp2 for i in layers)
    print(f"micro dp2x4 rel err {err:.3e} (max |ref| {max(ref[i].abs().max() for i in layers):.3e})"
          f"; mode off router grad max {off:.1e}")
    assert err < TOL
    assert off == 0.0  # zero LM loss, no LBL


def test_off_metrics_match_reference_topk(dp2):
    valid = _valid_rows().reshape(-1)
    cap = dp2[0][0]
    layers = sorted(cap["inputs"])
    counts = torch.stack([(_route(cap["inputs"][i] @ cap["weights"][i].t())
                           * valid.double()[:, None]).sum(0) for i in layers])
    expect = router_load_metrics(counts, sum(VALID), TOPK, layer_ids=layers)
    for rank in dp2:
        met = rank[1]["metrics"]
        assert set(met) == set(expect)
        for k, v in expect.items():
            assert met[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
        assert rank[1]["given_metrics"] == met  # prepare(local_counts=...) skips the forward
    print({k: round(v, 4) for k, v in expect.items() if k.startswith("moe/max")})


def test_bias_update_matches_formula_and_single_rank(tiny_hf_dir):
    spec = {"mode": "off", "bias": True, "rate": RATE}
    single = run_distributed(run_balance, 1, tiny_hf_dir, [spec], ALPHA)[0][0]
    dp2 = [[r[0], None, r[0]] for r in
           run_distributed(run_balance, 2, tiny_hf_dir, [dict(spec, capture=True)], ALPHA)]
    valid = _valid_rows()
    cap = dp2[0][2]
    moved = 0
    for i in sorted(cap["inputs"]):
        before = cap["bias_before"][i]
        counts = reference_bias_counts(cap["inputs"][i], cap["weights"][i], before, valid)
        expect = before + RATE * torch.sign(counts.mean() - counts)
        assert torch.equal(expect, before + expert_bias_update(counts[None], RATE)[0])
        for rank in dp2:
            assert torch.equal(rank[2]["counts"][i], counts), i
            assert torch.allclose(rank[2]["bias_after"][i], expect, rtol=0, atol=1e-8), i
        assert torch.equal(single["bias_after"][i], dp2[0][2]["bias_after"][i]), i
        moved += int((expect != before).sum())
    assert moved > 0
    errs = dp2[0][2]["errors"]
    assert "--moe-router-bias-update-rate" in errs[0]
    assert "mode" in errs[1] and "alpha" in errs[2]
    assert "frozen" in errs[3]
    assert "seq_aux_loss" in errs[4] and "--moe-aux-loss-coeff" in errs[4]


def test_refusals_without_model():
    with pytest.raises(ValueError, match="mode"):
        LoadBalance(mode="seq_aux_loss")
    with pytest.raises(ValueError, match="alpha"):
        LoadBalance(mode="global", alpha=-0.1)
    with pytest.raises(ValueError, match="ignored"):
        LoadBalance(mode="off", alpha=1e-3)
    with pytest.raises(RuntimeError, match="prepare"):
        with LoadBalance().forward_step(None, None, 1.0):
            pass
