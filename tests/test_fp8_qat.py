"""FP8 QAT through ModelOpt on the tiny Megatron model (CPU, one gloo rank), against float64
formulas written here: the forward computes with the blockwise-e4m3 weights (fresh scales after
a weight change), gradients are the straight-through ones, and the fake-quantised weights equal
the engine's FP8 weights wherever the Megatron blocks are the HF blocks (the fused qkv's are not:
its difference is reported, and must be non-zero, i.e. the check can tell).
Skipped when nvidia-modelopt is absent (it is in the ``dev`` and ``modelopt`` extras)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.testing import run_distributed

pytest.importorskip("modelopt.torch.quantization")


def _ref_qdq(w: torch.Tensor, bn: int = 128, bk: int = 128) -> torch.Tensor:
    w = w.double()
    out = torch.empty_like(w)
    for i in range(math.ceil(w.shape[0] / bn)):
        for j in range(math.ceil(w.shape[1] / bk)):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s = blk.abs().max().item() / 448.0 or 1.0
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s).to(torch.float8_e4m3fn).double() * s
    return out


def _worker(rank: int, world: int, hf_dir: str) -> dict:
    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, build_model, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.quant.qat import apply_fp8_qat, qdq_weight

    init_parallel(ParallelConfig(), device="cpu", seed=1)
    hf = load_hf_config(hf_dir)
    model = build_model(hf, transformer_config_from_hf(hf, ModelOptions(), tp=1, pp=1, ep=1, etp=1))
    load_hf_weights(model, hf_dir, hf)
    res = {"names": apply_fp8_qat(model)}
    mod = model.decoder.layers[1].self_attention.linear_proj
    with torch.no_grad():  # an optimizer step moved the weights: the scales must follow
        mod.weight.mul_(1.7).add_(0.01)
    x = torch.randn(6, 1, mod.weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x.requires_grad_(True)
    y, _ = mod(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    w = mod.weight.detach()
    res.update(w=w.clone(), x=x.detach().clone(), y=y.detach().clone(), g=g, grad_w=mod.weight.grad.clone(),
               grad_x=x.grad.clone())
    # the fake-quantised model exported to HF names vs the engine's FP8 rule on the plain export
    plain = {k: t.clone() for b in iter_hf_tensors(model, hf) for k, t in b.items()}
    saved = {}
    with torch.no_grad():
        for n in res["names"]:
            sub = model.get_submodule(n)
            saved[n] = sub.weight.detach().clone()
            sub.weight.copy_(qdq_weight(sub))
    res["qat_export"] = {k: t.clone() for b in iter_hf_tensors(model, hf) for k, t in b.items()}
    res["plain_export"] = plain
    destroy_parallel()
    return res


@pytest.fixture(scope="module")
def qat(tiny_hf_dir):
    return run_distributed(_worker, 1, tiny_hf_dir)[0]


def test_quantised_modules(qat):
    names = qat["names"]
    assert len(names) == 4 * (2 + 2 * 8), names  # qkv, proj, 8 experts x fc1/fc2 per layer
    assert not [n for n in names if "output_layer" in n or "router" in n or "embedding" in n]


def test_forward_uses_fresh_block_fp8_weights(qat):
    wq = _ref_qdq(qat["w"])
    want = qat["x"].double() @ wq.T
    torch.testing.assert_close(qat["y"].double(), want, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients(qat):
    assert torch.isfinite(qat["grad_w"]).all() and torch.isfinite(qat["grad_x"]).all()
    g, x = qat["g"].double().reshape(-1, qat["g"].shape[-1]), qat["x"].double().reshape(-1, qat["x"].shape[-1])
    torch.testing.assert_close(qat["grad_w"].double(), g.T @ x, rtol=1e-5, atol=1e-5)  # dW = g^T x (STE)
    torch.testing.assert_close(qat["grad_x"].double().reshape(-1, x.shape[-1]), g @ _ref_qdq(qat["w"]),
                               rtol=1e-5, atol=1e-5)  # dx = g W_qdq


def test_trainer_weights_vs_engine_weights(qat):
    from megatron_rl.quant.fp8 import is_quantized_name

    diffs = {}
    for k, w in qat["plain_export"].items():
        if not is_quantized_name(k):
            assert torch.equal(qat["qat_export"][k], w), k
            continue
        engine = _ref_qdq(w)
        diffs[k] = float((qat["qat_export"][k].double() - engine).abs().max() / w.abs().max())
    aligned = {k: d for k, d in diffs.items() if not any(p in k for p in ("q_proj", "k_proj", "v_proj"))}
    qkv = {k: d for k, d in diffs.items() if k not in aligned}
    print(f"\nQAT vs engine, max relative weight diff: aligned {max(aligned.values()):.2e}, "
          f"q/k/v {max(qkv.values()):.2e}")
    assert max(aligned.values()) < 1e-6  # o_proj, experts: the engine's FP8 weights exactly
    assert max(qkv.values()) > 1e-4  # fused qkv blocks straddle q/k/v: different scales
