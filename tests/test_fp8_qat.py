"""FP8 QAT through ModelOpt on the tiny Megatron model (CPU, one gloo rank), against float64
formulas written here: the forward computes with the blockwise-e4m3 weights (fresh scales after
a weight change), gradients are the straight-through ones, and the fake-quantised weights equal
the engine's FP8 weights wherever the Megatron blocks are the HF blocks (the fused qkv's are not:
its difference is reported, and must be non-zero, i.e. the check can tell).
Skipped when nvidia-modelopt is absent (it is in the ``dev`` and ``modelopt`` extras)."""

from __future__ import annotations


import pytest
import torch

from megatron_rl.testing import run_distributed

from _fp8_ref import ref_qdq

pytest.importorskip("modelopt.torch.quantization")


def _qat_export(model, names, hf) -> dict:
    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.quant.qat import qdq_weight

    with torch.no_grad():
        for n in names:
            sub = model.get_submodule(n)
            sub.weight.copy_(qdq_weight(sub))
    return {k: t.clone() for b in iter_hf_tensors(model, hf) for k, t in b.items()}


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
    with torch.no_grad():  # an optimizer step moved the weights: the scales must follow them down
        mod(torch.randn(2, 1, mod.weight.shape[1]))  # a forward at the old weights (calibrates)
        mod.weight.mul_(0.4).add_(0.001)
    x = torch.randn(6, 1, mod.weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x.requires_grad_(True)
    y, _ = mod(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    w = mod.weight.detach()
    res.update(w=w.clone(), x=x.detach().clone(), y=y.detach().clone(), g=g, grad_w=mod.weight.grad.clone(),
               grad_x=x.grad.clone())
    # the fake-quantised model exported to HF names vs the engine's FP8 rule on the plain export
    res["plain_export"] = {k: t.clone() for b in iter_hf_tensors(model, hf) for k, t in b.items()}
    # the qkv layer under QAT: forward with the HF-block weights, STE gradient
    qkv = model.decoder.layers[2].self_attention.linear_qkv
    xq = torch.randn(4, 1, qkv.weight.shape[1], generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    yq, _ = qkv(xq)
    gq = torch.randn(yq.shape, generator=torch.Generator().manual_seed(3))
    (yq * gq).sum().backward()
    res.update(qkv_x=xq.detach().clone(), qkv_y=yq.detach().clone(), qkv_g=gq, qkv_grad_w=qkv.weight.grad.clone(),
               qkv_w_qdq=qdq_weight(qkv).clone())
    res["qat_export"] = _qat_export(model, res["names"], hf)
    # ModelOpt's own blocks on the fused qkv (align_qkv=False), for comparison
    model2 = build_model(hf, transformer_config_from_hf(hf, ModelOptions(), tp=1, pp=1, ep=1, etp=1))
    load_hf_weights(model2, hf_dir, hf)
    res["modelopt_qkv_export"] = _qat_export(model2, apply_fp8_qat(model2, align_qkv=False), hf)
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
    wq = ref_qdq(qat["w"])
    want = qat["x"].double() @ wq.T
    torch.testing.assert_close(qat["y"].double(), want, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients(qat):
    assert torch.isfinite(qat["grad_w"]).all() and torch.isfinite(qat["grad_x"]).all()
    g, x = qat["g"].double().reshape(-1, qat["g"].shape[-1]), qat["x"].double().reshape(-1, qat["x"].shape[-1])
    torch.testing.assert_close(qat["grad_w"].double(), g.T @ x, rtol=1e-5, atol=1e-5)  # dW = g^T x (STE)
    torch.testing.assert_close(qat["grad_x"].double().reshape(-1, x.shape[-1]), g @ ref_qdq(qat["w"]),
                               rtol=1e-5, atol=1e-5)  # dx = g W_qdq


def test_qkv_layer_uses_hf_blocks_with_ste(qat):
    x = qat["qkv_x"].double().reshape(-1, qat["qkv_x"].shape[-1])
    g = qat["qkv_g"].double().reshape(-1, qat["qkv_g"].shape[-1])
    w = qat["qkv_w_qdq"].double()
    torch.testing.assert_close(qat["qkv_y"].double().reshape(g.shape), x @ w.T, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(qat["qkv_grad_w"]).all()
    torch.testing.assert_close(qat["qkv_grad_w"].double(), g.T @ x, rtol=1e-5, atol=1e-5)


def _rel_diffs(export: dict, plain: dict) -> dict[str, float]:
    from megatron_rl.quant.fp8 import is_quantized_name

    out = {}
    for k, w in plain.items():
        if not is_quantized_name(k):
            assert torch.equal(export[k], w), k
            continue
        out[k] = float((export[k].double() - ref_qdq(w)).abs().max() / w.abs().max())
    return out


def test_trainer_weights_vs_engine_weights(qat):
    diffs = _rel_diffs(qat["qat_export"], qat["plain_export"])
    mo = _rel_diffs(qat["modelopt_qkv_export"], qat["plain_export"])
    qkv = [k for k in diffs if any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    print(f"\nQAT vs engine, max relative weight diff: all {max(diffs.values()):.2e}; "
          f"q/k/v with ModelOpt's blocks on the fused tensor {max(mo[k] for k in qkv):.2e}")
    assert max(diffs.values()) < 1e-6  # every quantised tensor: the engine's FP8 weights
    assert max(mo[k] for k in qkv) > 1e-4  # ModelOpt's fused-qkv blocks straddle q/k/v
