"""megatron_rl.quant.fp8 against float64 references written here: per-block amax / scale, the e4m3
rounding bound per element, scale shapes of ragged weights, the name rule, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.quant import fp8

E4M3_REL = 2.0 ** -4  # half an ulp of a 3-bit mantissa, relative (normal range)
E4M3_SUB = 2.0 ** -10  # half the subnormal step 2^-9 (values below 2^-6), absolute in units of s


def _ref_scales(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """float64 amax/448 per block by explicit loops over the block grid (1.0 for zero blocks)."""
    w = w.double()
    n, k = w.shape
    out = torch.empty(math.ceil(n / bn), math.ceil(k / bk), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            a = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max().item()
            out[i, j] = a / 448.0 if a > 0 else 1.0
    return out


def _check_bound(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> None:
    ref = _ref_scales(w, bn, bk)
    assert s.dtype == torch.float32 and tuple(s.shape) == tuple(ref.shape)
    torch.testing.assert_close(s.double(), ref, rtol=2e-7, atol=0)
    w64 = w.double()
    s_el = ref.repeat_interleave(bn, 0)[: w.shape[0]].repeat_interleave(bk, 1)[:, : w.shape[1]]
    deq = q.double() * s.double().repeat_interleave(bn, 0)[: w.shape[0]].repeat_interleave(bk, 1)[:, : w.shape[1]]
    err = (deq - w64).abs()
    bound = torch.maximum(w64.abs() * E4M3_REL, s_el * E4M3_SUB) * (1 + 1e-5) + 1e-12
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    # every block's largest element hits +-448 exactly (scale = amax / 448)
    assert q.float().abs().max().item() == 448.0


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((300, 200), (128, 128)),
                                         ((129, 257), (128, 128)), ((77, 50), (64, 32)),
                                         ((5, 3), (128, 128))])
def test_quantize_vs_float64(shape, block):
    g = torch.Generator().manual_seed(sum(shape))
    # spread magnitudes over 8 decades so subnormals and large values both occur
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    q, s = fp8.quantize_block_fp8(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert tuple(s.shape) == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    _check_bound(w, q, s, *block)
    deq = fp8.dequantize_block_fp8(q, s, block, dtype=torch.float64)
    ref = q.double() * _ref_scales(w, *block).repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(
        block[1], 1)[:, : shape[1]]
    torch.testing.assert_close(deq, ref, rtol=2e-7, atol=0)


def test_bf16_input_and_stacked_experts():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 130, 140, generator=g).to(torch.bfloat16)
    q, s = fp8.quantize_block_fp8(w)
    assert tuple(s.shape) == (3, 2, 2) == fp8.scale_shape(w.shape)
    for e in range(3):
        _check_bound(w[e].float(), q[e], s[e], 128, 128)


def test_zero_block_no_division_by_zero():
    w = torch.zeros(256, 256)
    w[:128, :128] = torch.randn(128, 128)
    q, s = fp8.quantize_block_fp8(w)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    assert (q.float()[128:] == 0).all() and (q.float()[:, 128:] == 0).all()
    assert (fp8.dequantize_block_fp8(q, s)[128:] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_refused_naming_tensor(bad):
    w = torch.randn(10, 10)
    w[3, 4] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN/inf"):
        fp8.quantize_named({"model.layers.0.self_attn.q_proj.weight": w})


def test_bad_block_and_scale_shape():
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8.quantize_block_fp8(torch.randn(4, 4), (0, 128))
    q, s = fp8.quantize_block_fp8(torch.randn(200, 200))
    with pytest.raises(ValueError, match=r"x\.weight_scale_inv has shape \(1, 2\)"):
        fp8.dequantize_block_fp8(q, s[:1], name="x.weight")


NAMES = {  # HF name -> quantised? (declared by hand from the list)
    "model.embed_tokens.weight": False, "lm_head.weight": False, "model.norm.weight": False,
    "model.layers.0.input_layernorm.weight": False,
    "model.layers.0.post_attention_layernorm.weight": False,
    "model.layers.0.self_attn.q_norm.weight": False, "model.layers.0.self_attn.kv_a_layernorm.weight": False,
    "model.layers.0.self_attn.q_proj.weight": True, "model.layers.0.self_attn.k_proj.weight": True,
    "model.layers.0.self_attn.v_proj.weight": True, "model.layers.0.self_attn.o_proj.weight": True,
    "model.layers.0.self_attn.q_proj.bias": False,
    "model.layers.0.self_attn.q_a_proj.weight": True, "model.layers.0.self_attn.q_b_proj.weight": True,
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": True,
    "model.layers.0.self_attn.kv_b_proj.weight": True,
    "model.layers.0.mlp.gate_proj.weight": True, "model.layers.0.mlp.up_proj.weight": True,
    "model.layers.0.mlp.down_proj.weight": True,
    "model.layers.1.mlp.gate.weight": False, "model.layers.1.mlp.gate.e_score_correction_bias": False,
    "model.layers.1.mlp.experts.7.gate_proj.weight": True, "model.layers.1.mlp.experts.7.down_proj.weight": True,
    "model.layers.1.mlp.experts.gate_up_proj": True, "model.layers.1.mlp.experts.down_proj": True,
    "model.layers.1.mlp.shared_experts.up_proj.weight": True, "model.layers.1.mlp.shared_expert.down_proj.weight": True,
    "model.layers.1.mlp.shared_expert_gate.weight": False,
    "model.layers.1.block_sparse_moe.gate.weight": False,
    "model.layers.1.block_sparse_moe.experts.0.w1.weight": True,
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_name_rule(name):
    assert fp8.is_quantized_name(name) is NAMES[name]


def test_named_round_trip_and_missing_scale():
    named = {"model.layers.0.self_attn.o_proj.weight": torch.randn(64, 200),
             "model.layers.0.mlp.gate.weight": torch.randn(4, 64), "model.norm.weight": torch.ones(64)}
    q = fp8.quantize_named(named)
    assert list(q) == ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight_scale_inv",
                       "model.layers.0.mlp.gate.weight", "model.norm.weight"]
    assert q["model.layers.0.mlp.gate.weight"] is named["model.layers.0.mlp.gate.weight"]
    back = fp8.dequantize_named(q)
    assert set(back) == set(named)
    w = named["model.layers.0.self_attn.o_proj.weight"]
    _check_bound(w, q["model.layers.0.self_attn.o_proj.weight"],
                 q["model.layers.0.self_attn.o_proj.weight_scale_inv"], 128, 128)
    del q["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight"):
        fp8.dequantize_named(q)


def test_quantization_config_fields():
    cfg = fp8.quantization_config({"lm_head.weight": 2, "model.layers.0.mlp.gate.weight": 2,
                                   "model.layers.0.self_attn.q_proj.weight": 2, "model.norm.weight": 1,
                                   "model.embed_tokens.weight": 2})
    assert cfg == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]}
    assert fp8.fp8_block_of({"quantization_config": cfg}) == (128, 128)
    assert fp8.fp8_block_of({}) is None
    with pytest.raises(ValueError, match="activation_scheme"):
        fp8.fp8_block_of({"quantization_config": {**cfg, "activation_scheme": "static"}})
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8.fp8_block_of({"quantization_config": {**cfg, "weight_block_size": None}})


def test_activation_fake_quant_vs_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=g) * torch.exp(torch.randn(5, 300, generator=g) * 2)
    y = fp8.fake_quant_activations(x, 128)
    x64 = x.double()
    for t in range(5):
        for j in range(0, 300, 128):
            blk = x64[t, j:j + 128]
            s = blk.abs().max().item() / 448.0
            err = (y[t, j:j + 128].double() - blk).abs()
            bound = torch.maximum(blk.abs() * E4M3_REL, torch.full_like(blk, s * E4M3_SUB)) * (1 + 1e-5)
            assert (err <= bound).all()
            assert (y[t, j:j + 128].double() - blk).abs().max() > 0 or s == 0


def test_gpu_check_without_cuda_writes_skipped(tmp_path, monkeypatch):
    import json

    from conftest import load_tool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_tool("gpu_check_fp8").main(str(tmp_path)) == 0
    got = json.loads((tmp_path / "fp8.json").read_text())
    assert got == {"status": "skipped", "figures": {}, "skipped": {"all": "no CUDA device"}}
