"""Fused loss ops (csrc/fused_loss*, megatron_rl/ops) against independent references.

References: float64 torch (log_softmax / entropy / autograd) on the gathered full-vocabulary
logits, the pure-PyTorch ``losses.mismatch`` + ``losses.policy`` composition in float64, and the
torch loss path of the training loop (GRPO micro-batch loss and gradient norm).
GPU-marked tests compare the CUDA op with the CPU op and float64; they are skipped without CUDA.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from megatron_rl import ops
from megatron_rl.ops.reference import logprobs_entropy_reference, ppo_reference
from megatron_rl.testing import run_distributed

pytestmark = pytest.mark.skipif(not ops.has_cpu_op(), reason="megatron_rl._C not built")
F = ops.vocab_parallel_logprobs_entropy


def _ref64(logits, target, temperature=1.0, vocab_size=None):
    return logprobs_entropy_reference(logits.double(), target, temperature=temperature,
                                      vocab_size=vocab_size)


def _data(t, v, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, v, generator=g) * scale).to(dtype), torch.randint(0, v, (t,), generator=g)


# ------------------------------------------------------------------ build

def test_ops_built_where_the_toolchain_exists():
    """CI gate: the CPU op always; the CUDA op wherever nvcc and a CUDA torch exist."""
    from megatron_rl import _optional

    assert _optional.has_cpu_ext(), _optional.describe_ext()
    nvcc = shutil.which("nvcc") or next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.exists()), None)
    if nvcc and torch.version.cuda:
        assert _optional.has_cuda_ext(), f"nvcc at {nvcc} but {_optional.describe_ext()}"


# ------------------------------------------------------------------ forward values

@pytest.mark.parametrize("t,v,temp", [(0, 7, 1.0), (1, 7, 1.0), (37, 1001, 0.7), (5, 2 ** 14 + 3, 1.3)])
def test_forward_matches_float64(t, v, temp):
    x, tgt = _data(t, v, seed=t)
    lp, h = F(x, tgt, temperature=temp)
    lp64, h64 = _ref64(x, tgt, temp)
    assert lp.shape == (t,) and h.shape == (t,) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), lp64, atol=2e-5, rtol=0)
    torch.testing.assert_close(h.double(), h64, atol=2e-5, rtol=0)


def test_extreme_rows_constant_shift_and_entropy_bounds():
    v = 513
    x, tgt = _data(6, v, seed=1)
    x[0] = 1e4 * torch.sign(torch.randn(v))  # +-1e4
    x[1] = 0.25  # all equal: H = log V exactly, logp = -log V
    x[2, :] = -1e4
    x[2, 17] = 1e4  # one-hot
    lp, h = F(x, tgt)
    lp64, h64 = _ref64(x, tgt)
    torch.testing.assert_close(lp[1:].double(), lp64[1:], atol=2e-5, rtol=0)
    assert abs(float(lp[0]) - float(lp64[0])) <= 2.5e-7 * abs(float(lp64[0]))  # |logp| ~ 2e4: fp32 ulp
    torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=0)
    assert abs(float(h[1]) - math.log(v)) < 1e-5 and abs(float(lp[1]) + math.log(v)) < 1e-5
    assert ((h >= -1e-6) & (h <= math.log(v) + 1e-5)).all()
    shift = torch.tensor([100.0, -3.0, 0.5, 7.0, -50.0, 1000.0])[:, None]
    lp2, h2 = F(x + shift, tgt)
    torch.testing.assert_close(lp2[3:], lp[3:], atol=5e-5, rtol=0)  # invariance to a row constant
    torch.testing.assert_close(h2, h, atol=5e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-4), (torch.float16, 2e-4)])
def test_dtypes_and_noncontiguous_views(dtype, tol):
    s, b, v = 7, 3, 301  # Megatron hands [S, B, V]; the loss sees its [B, S, V] transpose
    full, _ = _data(s * b, v, seed=2, dtype=dtype)
    sbv = full.view(s, b, v)
    bsv = sbv.transpose(0, 1)  # non-contiguous
    tgt = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(3))
    lp, h = F(bsv, tgt)
    lp64, h64 = _ref64(bsv, tgt)  # the reference sees exactly the rounded 16-bit values
    assert lp.shape == (b, s)
    torch.testing.assert_close(lp.double(), lp64, atol=tol, rtol=0)
    torch.testing.assert_close(h.double(), h64, atol=tol, rtol=0)
    sliced = torch.cat([full, full], -1)[:, 5: 5 + v]  # row stride != V, offset start
    lp_s, _ = F(sliced, tgt.T.reshape(-1))
    torch.testing.assert_close(lp_s.double(), _ref64(sliced, tgt.T.reshape(-1))[0], atol=tol, rtol=0)


def test_padded_vocab_and_shard_edges_single_process():
    v_real, v_local, tp = 29, 8, 4  # padded to 32: the last shard holds 5 real columns + 3 pads
    x, _ = _data(9, tp * v_local, seed=4)
    tgt = torch.tensor([0, 7, 8, 15, 16, 23, 24, 28, 27])  # first / last column of every shard
    lp64, h64 = _ref64(x, tgt, vocab_size=v_real)
    stats = []
    for r in range(tp):
        shard = x[:, r * v_local:(r + 1) * v_local]
        start, n_valid = ops.vocab.shard_bounds(v_local, None, r * v_local, v_real)
        stats.append(torch.ops.megatron_rl.vocab_stats(shard, tgt, start, n_valid, 1.0))
    # merge the shards as the TP combine does, but in one process
    lp, h, _ = _combine_parts(stats)
    torch.testing.assert_close(lp.double(), lp64, atol=2e-5, rtol=0)
    torch.testing.assert_close(h.double(), h64, atol=2e-5, rtol=0)
    lp1, h1 = F(x, tgt, vocab_size=v_real)
    torch.testing.assert_close(lp1.double(), lp64, atol=2e-5, rtol=0)


def _combine_parts(parts):
    m = torch.stack([p[..., 0] for p in parts]).max(0).values
    s = sum(torch.exp(p[..., 0] - m) * p[..., 1] for p in parts)
    w = sum(torch.exp(p[..., 0] - m) * (p[..., 2] + (p[..., 0] - m) * p[..., 1]) for p in parts)
    tgt = sum(p[..., 3] for p in parts)
    return tgt - m - torch.log(s), torch.log(s) - w / s, m + torch.log(s)


def test_bitwise_determinism_run_to_run_and_batch_composition():
    x, tgt = _data(64, 3001, seed=5)
    a = F(x, tgt)
    b = F(x.clone(), tgt.clone())
    sub = F(x[40:50].clone(), tgt[40:50].clone())  # a different batch holding the same rows
    rev = F(x.flip(0).contiguous(), tgt.flip(0).contiguous())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][40:50], sub[0]) and torch.equal(a[1][40:50], sub[1])
    assert torch.equal(a[0], rev[0].flip(0)) and torch.equal(a[1], rev[1].flip(0))
    n = torch.get_num_threads()
    torch.set_num_threads(1 if n > 1 else 2)
    try:
        other = F(x, tgt)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


# ------------------------------------------------------------------ backward

def _grad64(x, tgt, g_lp, g_h, temperature=1.0, vocab_size=None):
    x64 = x.detach().double().requires_grad_()
    lp, h = _ref64(x64, tgt, temperature, vocab_size)
    ((lp * g_lp.double()).sum() + (h * g_h.double()).sum()).backward()
    return x64.grad


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_backward_in_place_matches_autograd_float64(temp):
    v_real, v = 997, 1003  # 6 padded columns: zero gradient
    x, tgt = _data(23, v, seed=6)
    tgt = tgt.clamp(max=v_real - 1)
    g = torch.Generator().manual_seed(7)
    g_lp, g_h = torch.randn(23, generator=g), torch.randn(23, generator=g)
    g_lp[3] = g_h[3] = 0.0  # a masked token
    ref = _grad64(x, tgt, g_lp, g_h, temp, v_real)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output layer's logits
    ptr = logits.data_ptr()
    seen = {}
    logits.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
    lp, h = F(logits, tgt, temperature=temp, vocab_size=v_real)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    assert seen["ptr"] == ptr  # the gradient was written into the logits' own storage
    torch.testing.assert_close(leaf.grad.double(), ref, atol=1e-5, rtol=0)
    assert leaf.grad[:, v_real:].abs().max() == 0 and leaf.grad[3].abs().max() == 0
    leaf2 = x.clone().requires_grad_()
    lp2, h2 = F(leaf2, tgt, temperature=temp, vocab_size=v_real, inplace_backward=False)
    ((lp2 * g_lp).sum() + (h2 * g_h).sum()).backward()
    assert torch.equal(leaf2.grad, leaf.grad) and torch.equal(leaf2.detach(), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_16bit(dtype):
    x, tgt = _data(11, 257, seed=8, dtype=dtype)
    g_lp = torch.randn(11, generator=torch.Generator().manual_seed(9))
    ref = _grad64(x, tgt, g_lp, torch.zeros(11))
    leaf = x.clone().requires_grad_()
    lp, _ = F(leaf * 1, tgt)
    (lp * g_lp).sum().backward()
    assert leaf.grad.dtype == dtype
    torch.testing.assert_close(leaf.grad.double(), ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ tensor parallel (gloo)

def _tp_worker(rank: int, world: int) -> dict:
    torch.distributed.init_process_group("gloo")
    group = torch.distributed.group.WORLD
    v_real, v_local = 4 * 13 - 3, 13  # odd V_local, padded vocabulary on the last shard
    full, _ = _data(33, world * v_local, seed=10, dtype=torch.float32)
    if world < 4:
        full = full[:, :world * v_local]
        v_real = world * v_local - 1
    tgt = torch.randint(0, v_real, (33,), generator=torch.Generator().manual_seed(11))
    tgt[:world] = torch.arange(world) * v_local  # shard edges
    tgt[world:2 * world] = torch.arange(world) * v_local + v_local - 1
    tgt = tgt.clamp(max=v_real - 1)
    g = torch.Generator().manual_seed(12)
    g_lp, g_h = torch.randn(33, generator=g), torch.randn(33, generator=g)
    shard = full[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    lp, h = F(shard * 1.0, tgt, group=group, vocab_size=v_real, temperature=0.7)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    lp64, h64 = _ref64(full, tgt, 0.7, v_real)
    ref = _grad64(full, tgt, g_lp, g_h, 0.7, v_real)  # [33, world * V_local], 0 on the padding
    # the pure-torch twin (every column counts): float64 in, against the dense formula
    from megatron_rl.ops.reference import vocab_parallel_logprobs_entropy_torch

    lp_t, h_t = vocab_parallel_logprobs_entropy_torch(
        full.double()[:, rank * v_local:(rank + 1) * v_local], tgt, group=group, temperature=0.7)
    lp_d, h_d = _ref64(full, tgt, 0.7)
    twin = max((lp_t - lp_d).abs().max().item(), (h_t - h_d).abs().max().item())
    torch.distributed.destroy_process_group()
    return {"lp": (lp.double() - lp64).abs().max().item(), "h": (h.double() - h64).abs().max().item(),
            "g": (shard.grad.double() - ref[:, rank * v_local:(rank + 1) * v_local]).abs().max().item(),
            "lp_bits": lp.tolist(), "twin": twin}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_vs_unsharded_float64(tp):
    res = run_distributed(_tp_worker, tp)
    for r in res:
        assert r["lp"] < 2e-5 and r["h"] < 2e-5 and r["g"] < 1e-5 and r["twin"] < 1e-12, r
        assert r["lp_bits"] == res[0]["lp_bits"]  # identical on every rank


# ------------------------------------------------------------------ PPO op

def _ppo_inputs(b=6, l=40, seed=13, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, l, generator=g, dtype=dtype) * 3
    # log-ratios on a grid away from every clip / band edge (finite differences stay on one side)
    grid = torch.tensor([-0.6, -0.3, -0.05, 0.0, 0.04, 0.12, 0.35, 0.8], dtype=dtype)
    lp = old + grid[torch.randint(0, 8, (b, l), generator=g)]
    rollout = old - grid[torch.randint(0, 8, (b, l), generator=g)] * 0.5
    adv = torch.randn(b, l, generator=g, dtype=dtype)
    adv[adv.abs() < 0.05] = 0.3
    mask = torch.rand(b, l, generator=g) < 0.8
    mask[0] = False  # an empty row
    return lp, old, rollout, adv, mask


SETTINGS = [
    {},
    {"dual_clip_c": 1.5, "eps_high": 0.28},
    {"tis_cap": 1.1, "icepop_bounds": (0.85, 1.12)},
    {"tis_cap": 2.0, "dual_clip_c": 2.0, "icepop_bounds": (0.8, 1.25), "seq_bounds": (0.97, 1.03)},
]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kw", SETTINGS)
def test_ppo_matches_reference_float64(kw, agg):
    lp, old, rollout, adv, mask = _ppo_inputs()
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    extra = dict(agg=agg, max_response_len=64, global_num_tokens=150, global_num_seqs=5)
    roll = rollout if kw.get("tis_cap") or kw.get("icepop_bounds") else None
    loss, m = ops.fused_policy_loss(a, old, adv, mask, rollout_logprobs=roll, **kw, **extra)
    ref, rm = ppo_reference(b, old, adv, mask, rollout_logprobs=roll, **kw, **extra)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-12 and ref.item() != 0
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    for k, v in rm.items():
        assert abs(float(m[k]) - float(v)) < 1e-9, (k, float(m[k]), float(v))
    assert float(m["clip_frac_low"] + m["clip_frac_high"]) > 0
    if kw.get("dual_clip_c"):
        assert float(m["dual_clip_frac"]) > 0
    if kw.get("icepop_bounds"):
        assert 0 < float(m["mismatch/masked_frac"]) < 1


def test_ppo_counters_float32_and_determinism():
    lp, old, rollout, adv, mask = (t.float() if t.is_floating_point() else t for t in _ppo_inputs(b=40, l=300))
    kw = dict(tis_cap=1.05, icepop_bounds=(0.8, 1.2), dual_clip_c=3.0)
    l1, m1 = ops.fused_policy_loss(lp, old, adv, mask, rollout_logprobs=rollout, **kw)
    l2, m2 = ops.fused_policy_loss(lp.clone(), old, adv, mask, rollout_logprobs=rollout, **kw)
    assert torch.equal(l1, l2) and all(torch.equal(m1[k], m2[k]) for k in m1)
    ref, rm = ppo_reference(lp.double(), old.double(), adv.double(), mask, rollout_logprobs=rollout.double(), **kw)
    assert abs(float(l1) - float(ref)) < 1e-6


def test_gradcheck_composite_ppo_dual_clip_tis_icepop_entropy():
    """d/dlogits of PPO + dual clip + TIS + IcePop + entropy bonus through both fused ops."""
    t, v = 12, 9
    g = torch.Generator().manual_seed(14)
    logits = (torch.randn(t, v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    tgt = torch.randint(0, v, (t,), generator=g)
    with torch.no_grad():
        lp0, _ = _ref64(logits, tgt)
    grid = torch.tensor([-0.6, -0.3, 0.04, 0.12, 0.35, 0.8], dtype=torch.float64)
    old = (lp0 - grid[torch.randint(0, 6, (t,), generator=g)]).view(3, 4)
    rollout = old - grid[torch.randint(0, 6, (t,), generator=g)].view(3, 4) * 0.4
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64).repeat(3, 1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False

    def fn(x):
        lp, h = F(x, tgt, inplace_backward=False)
        loss, _ = ops.fused_policy_loss(lp.view(3, 4), old, adv, mask, rollout_logprobs=rollout,
                                        dual_clip_c=2.0, tis_cap=1.1, icepop_bounds=(0.7, 1.3))
        return loss - 0.03 * (h.view(3, 4) * mask).sum() / mask.sum()

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------ errors

def test_errors_name_the_argument():
    x, tgt = _data(4, 10)
    with pytest.raises(RuntimeError, match="'target'"):
        F(x, tgt.int())
    with pytest.raises(RuntimeError, match="'target' has shape"):
        F(x, tgt[:3])
    with pytest.raises(RuntimeError, match="'logits' has dtype"):
        F(x.int(), tgt)
    with pytest.raises(RuntimeError, match="'logits' needs unit stride"):
        F(x.T, torch.zeros(10, dtype=torch.long))
    with pytest.raises(RuntimeError, match="'logits' must be"):
        F(x[0], tgt[0])
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'target' is on"):
            F(x, tgt.cuda())
    else:
        with pytest.raises(RuntimeError, match="not available on meta"):
            F(x.to("meta"), tgt)
    lp, old, rollout, adv, mask = _ppo_inputs()
    with pytest.raises(RuntimeError, match="'advantages' has shape"):
        ops.fused_policy_loss(lp, old, adv[:, :3], mask)
    with pytest.raises(RuntimeError, match="'old_logprobs' has dtype"):
        ops.fused_policy_loss(lp, old.float(), adv, mask)
    with pytest.raises(RuntimeError, match="'rollout_logprobs' is required"):
        ops.fused_policy_loss(lp, old, adv, mask, tis_cap=2.0)
    with pytest.raises(ValueError, match="dual_clip_c"):
        ops.fused_policy_loss(lp, old, adv, mask, dual_clip_c=0.5)


# ------------------------------------------------------------------ CUDA (tools/gpu_check.sh)

def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not ops.has_cuda_op():
        pytest.fail("a CUDA device but megatron_rl._C_cuda is not built")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_and_float64(dtype):
    _cuda_or_skip()
    x, tgt = _data(257, 50_001, seed=30, dtype=dtype)
    x[0] = 1e4 * torch.sign(torch.randn(50_001))
    g_lp, g_h = torch.randn(257), torch.randn(257)
    out = {}
    for dev in ("cpu", "cuda"):
        leaf = x.to(dev).requires_grad_()
        lp, h = F(leaf * 1, tgt.to(dev), temperature=0.7, vocab_size=50_000)
        ((lp * g_lp.to(dev)).sum() + (h * g_h.to(dev)).sum()).backward()
        out[dev] = (lp.cpu().double(), h.cpu().double(), leaf.grad.cpu().double())
    lp64, h64 = _ref64(x, tgt, 0.7, 50_000)
    tol = 3e-5 if dtype == torch.float32 else 3e-4
    for dev in ("cpu", "cuda"):
        torch.testing.assert_close(out[dev][0][1:], lp64[1:], atol=tol, rtol=0)
        torch.testing.assert_close(out[dev][1], h64, atol=tol, rtol=0)
    torch.testing.assert_close(out["cuda"][2], out["cpu"][2], atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)
    again = F(x.cuda(), tgt.cuda(), temperature=0.7, vocab_size=50_000)
    assert torch.equal(again[0].cpu().double(), out["cuda"][0])  # bitwise run to run


@pytest.mark.gpu
def test_cuda_ppo_matches_cpu():
    _cuda_or_skip()
    lp, old, rollout, adv, mask = _ppo_inputs(b=64, l=700)
    kw = dict(tis_cap=1.5, icepop_bounds=(0.8, 1.25), seq_bounds=(0.9, 1.1), dual_clip_c=2.0)
    a = lp.clone().requires_grad_()
    c = lp.cuda().requires_grad_()
    la, ma = ops.fused_policy_loss(a, old, adv, mask, rollout_logprobs=rollout, **kw)
    lc, mc = ops.fused_policy_loss(c, old.cuda(), adv.cuda(), mask.cuda(), rollout_logprobs=rollout.cuda(), **kw)
    la.backward()
    lc.backward()
    assert abs(la.item() - lc.item()) < 1e-12
    torch.testing.assert_close(c.grad.cpu(), a.grad, atol=1e-12, rtol=0)
    for k in ma:
        if k != "kept_mask":
            assert abs(float(ma[k]) - float(mc[k])) < 1e-9, k


@pytest.mark.gpu
def test_cuda_large_and_backward_allocates_no_logits_buffer():
    """T * V > 2^31 elements (int64 indexing), and the backward's peak memory stays O(T)."""
    _cuda_or_skip()
    t, v = 14_200, 151_936  # 2.16e9 elements, 4.3 GB of bf16
    if torch.cuda.get_device_properties(0).total_memory < 3 * t * v * 2:
        pytest.skip("not enough GPU memory for T*V > 2^31 in bf16")
    g = torch.Generator(device="cuda").manual_seed(0)
    leaf = torch.randn(t, v, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    tgt = torch.randint(0, v, (t,), device="cuda", generator=g)
    tgt[-1] = v - 1
    logits = leaf * 1  # non-leaf: its storage receives the gradient
    lp, h = F(logits, tgt)
    rows = [0, t // 2, t - 1]  # beyond 2^31 elements: compare with float64 rows
    lp64, h64 = _ref64(logits.detach()[rows].cpu(), tgt[rows].cpu())
    torch.testing.assert_close(lp[rows].cpu().double(), lp64, atol=2e-4, rtol=0)
    torch.testing.assert_close(h[rows].cpu().double(), h64, atol=2e-4, rtol=0)
    loss = (lp + 0.01 * h).sum()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    captured = {}
    logits.register_hook(lambda grad: captured.update(peak=torch.cuda.max_memory_allocated()))
    loss.backward(inputs=[logits])  # stop at the logits: the leaf's copy is not the op's
    extra = captured["peak"] - base
    assert extra < t * v * 2 / 4, f"backward allocated {extra} bytes (logits: {t * v * 2})"
    assert torch.isfinite(logits.float().sum())
