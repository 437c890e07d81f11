"""Mixtral, OLMoE and Qwen2-MoE: Megatron-Core (our providers + adapters) against HF transformers.

Per family a tiny random HF model is made here (fp32; every weight re-drawn -- norms around 1,
biases and matrices ~0.1 -- so a swapped, transposed or dropped tensor shows), written with
``save_pretrained`` (the on-disk layout transformers 5 writes: for Mixtral the hub's
``block_sparse_moe.experts.{e}.w1/w2/w3``) and read back by ``*ForCausalLM.from_pretrained``
(eager attention, eval) for the reference logits. One 2-rank gloo launch runs, per family, the
layouts none (2 DP ranks), TP2 (ETP2), TP2+EP2+ETP1+SP and PP2 (1F1B); rank 0 of "none" also exports
(round trip), loads transformers' in-memory fused-expert state dict, and checks OLMoE's
full-width QK norm under TP2 (forward and gradients) against a single-process formula.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from _parity import forward_per_sample, stream_hf

TOL = 1e-4
V, B, S = 300, 2, 12
SHAPE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128,
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # family -> (transformers config class, model class, extra config)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=32, num_local_experts=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=32, num_experts=4, norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=4, norm_topk_prob=False, mlp_only_layers=[2])),
}
LAYOUTS = [  # (name, ParallelConfig kwargs)
    ("none", {}),
    ("tp2", dict(tp=2)),  # experts ETP2 (expert fc1/fc2 sharded), no SP
    ("tp2_ep2_etp1_sp", dict(tp=2, ep=2, etp=1, sequence_parallel=True)),
    ("pp2", dict(pp=2)),
]


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = p.dim() == 1 and not name.endswith(".bias")
            p.copy_(1 + 0.2 * noise if is_norm else 0.1 * noise)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """family -> {"hf": save_pretrained dir, "fused": in-memory state dict, "logits": [2,B,S,V]}."""
    import transformers

    root = tmp_path_factory.mktemp("families")
    ids = torch.randint(0, V, (2, B, S), generator=torch.Generator().manual_seed(1))
    out = {"ids": ids}
    for i, (family, (cfg_cls, model_cls, extra)) in enumerate(FAMILIES.items()):
        cfg = getattr(transformers, cfg_cls)(**SHAPE, **extra)
        torch.manual_seed(i)
        model = getattr(transformers, model_cls)(cfg)
        _randomise(model, seed=i)
        hf_dir, fused_dir = root / family / "hf", root / family / "fused"
        model.save_pretrained(hf_dir)
        fused_dir.mkdir(parents=True)
        (fused_dir / "config.json").write_text((hf_dir / "config.json").read_text())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  fused_dir / "model.safetensors", metadata={"format": "pt"})
        ref = getattr(transformers, model_cls).from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = torch.stack([ref(x).logits for x in ids])
        out[family] = dict(hf=str(hf_dir), fused=str(fused_dir), logits=logits)
    return out


# ------------------------------------------------------------------------------ the ranks


_forward = forward_per_sample


def _build(pc, hf_dir: str):
    from megatron.core import parallel_state as ps

    from megatron_rl.models import (ModelOptions, build_model, load_hf_config,
                                    transformer_config_from_hf)

    hf_cfg = load_hf_config(hf_dir)
    opts = ModelOptions(sequence_parallel=pc.sequence_parallel)
    cfg = transformer_config_from_hf(hf_cfg, opts, tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
    return build_model(hf_cfg, cfg, pre_process=ps.is_pipeline_first_stage(),
                       post_process=ps.is_pipeline_last_stage()).eval()


def _extras(model, dirs: dict) -> dict:
    """Export round trip (per-expert and fused) and the fused-layout load, rank 0, 1 rank."""
    from megatron_rl.checkpoint import export_hf_state_dict, load_hf_weights

    out = {"export": export_hf_state_dict(model, dirs["hf"]),
           "export_fused": export_hf_state_dict(model, dirs["hf"], fused_experts=True)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    load_hf_weights(model, dirs["fused"])
    out["fused_equal"] = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    return out


def _qk_norm_tp(config) -> dict:
    """OLMoE's FullWidthQKNorm on this TP rank's heads: output and grads (x, weight) for a loss
    summed over ranks, vs the same numbers from the full-width formula on one process."""
    from megatron.core import parallel_state as ps

    from megatron_rl.models.olmoe import FullWidthQKNorm

    g = torch.Generator().manual_seed(3)
    nh, hd = config.num_attention_heads, config.kv_channels
    x, w, r = (torch.randn(5, 2, nh, hd, generator=g), 1 + 0.2 * torch.randn(nh * hd, generator=g),
               torch.randn(5, 2, nh, hd, generator=g))
    xf = x.clone().requires_grad_()
    wf = w.clone().requires_grad_()
    ms = xf.flatten(-2).pow(2).mean(-1, keepdim=True)
    ref = (wf * (xf.flatten(-2) * torch.rsqrt(ms + 1e-5))).view_as(x)
    (ref * r).sum().backward()
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sl = slice(rank * nh // tp, (rank + 1) * nh // tp)
    norm = FullWidthQKNorm(hd, config, 1e-5, which="q")
    norm.weight.data.copy_(w.view(nh, hd)[sl].flatten())
    xl = x[:, :, sl].clone().requires_grad_()
    y = norm(xl)
    (y * r[:, :, sl]).sum().backward()
    return dict(tp=tp, y=(y - ref[:, :, sl]).abs().max().item(),
                dx=(xl.grad - xf.grad[:, :, sl]).abs().max().item(),
                dw=(norm.weight.grad - wf.grad.view(nh, hd)[sl].flatten()).abs().max().item())


def _worker(rank: int, world: int, dirs: dict, ids: torch.Tensor) -> list[dict]:
    import time

    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint import load_hf_weights
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel

    results = []
    for family in FAMILIES:
        for name, kwargs in LAYOUTS:
            t0 = time.perf_counter()
            pc = ParallelConfig(**kwargs)
            init_parallel(pc, device="cpu")
            model = _build(pc, dirs[family]["hf"])
            n_params = load_hf_weights(model, dirs[family]["hf"])
            dp_rank = ps.get_data_parallel_rank()
            logits = _forward(model, ids[dp_rank])
            res = dict(family=family, layout=name, rank=rank, dp_rank=dp_rank, n_params=n_params)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                res["logits"] = logits
            if name == "none" and rank == 0:
                res.update(_extras(model, dirs[family]))
            if name == "tp2_ep2_etp1_sp":  # the multi-rank export path (tools/convert)
                from megatron_rl.checkpoint.gather import gather_full_state_dict

                res["full"] = gather_full_state_dict(model)
            if name != "none":
                streamed = stream_hf(model, dirs[family]["hf"])  # collective; lands on rank 0
                if rank == 0:
                    res["streamed"] = streamed
            if family == "olmoe" and name == "tp2":
                res["qk_norm_tp"] = _qk_norm_tp(model.config)
            res["seconds"] = time.perf_counter() - t0
            results.append(res)
            ps.destroy_model_parallel()
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def runs(ckpts):
    from megatron_rl.testing import run_distributed

    dirs = {f: {k: ckpts[f][k] for k in ("hf", "fused")} for f in FAMILIES}
    per_rank = run_distributed(_worker, 2, dirs, ckpts["ids"])
    return [r for rank_results in per_rank for r in rank_results]


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf(runs, ckpts, family, layout):
    got = [r for r in runs if r["family"] == family and r["layout"] == layout and "logits" in r]
    assert got, f"{family}/{layout}: no rank returned logits"
    for r in got:
        want = ckpts[family]["logits"][r["dp_rank"]]
        assert r["logits"].shape[-1] >= V and r["logits"].shape[:2] == want.shape[:2]
        err = (r["logits"][..., :V] - want).abs().max().item()
        assert err < TOL, f"{family}/{layout} dp {r['dp_rank']}: max |logits - HF| = {err:.2e}"
    assert {r["dp_rank"] for r in got} == ({0, 1} if layout == "none" else {0})


def _rank0(runs, family) -> dict:
    return next(r for r in runs if r["family"] == family and r["layout"] == "none"
                and r["rank"] == 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_round_trip_is_byte_identical(runs, ckpts, family):
    extras = _rank0(runs, family)
    for key, src in (("export", "hf"), ("export_fused", "fused")):
        want = load_file(f"{ckpts[family][src]}/model.safetensors")
        got = extras[key]
        assert set(got) == set(want), f"{key}: {sorted(set(got) ^ set(want))[:6]}"
        for k, t in want.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
            assert got[k].numpy().tobytes() == t.numpy().tobytes(), f"{key}: {k}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gathered_tp_ep_state_exports_to_the_checkpoint(runs, ckpts, family):
    """TP2+EP2 shards gathered (``gather_full_state_dict``) and merged over ranks, then
    ``full_state_to_hf``: the HF checkpoint again, byte for byte."""
    from megatron_rl.checkpoint.hf_loader import full_state_to_hf
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf

    full = {}
    for r in runs:
        if r["family"] == family and r["layout"] == "tp2_ep2_etp1_sp":
            full.update(r["full"])
    hf = load_hf_config(ckpts[family]["hf"])
    got = full_state_to_hf(full, transformer_config_from_hf(hf, ModelOptions()), hf)
    want = load_file(f"{ckpts[family]['hf']}/model.safetensors")
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    for k, t in want.items():
        assert got[k].numpy().tobytes() == t.numpy().tobytes(), k


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streaming_export_from_every_layout_is_byte_identical(runs, ckpts, family):
    """``iter_hf_tensors`` (the path of tools/convert.py and weight sync) from TP2, TP2+EP2+SP
    and PP2 reproduces the HF checkpoint byte for byte."""
    want = load_file(f"{ckpts[family]['hf']}/model.safetensors")
    checked = [r["layout"] for r in runs if r["family"] == family and "streamed" in r]
    assert sorted(checked) == sorted(name for name, _ in LAYOUTS if name != "none")
    for r in runs:
        if r["family"] == family and "streamed" in r:
            got = r["streamed"]
            assert set(got) == set(want), (r["layout"], sorted(set(got) ^ set(want))[:6])
            for k, t in want.items():
                assert got[k].numpy().tobytes() == t.numpy().tobytes(), (r["layout"], k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_expert_layout_loads_the_same_weights(runs, family):
    assert _rank0(runs, family)["fused_equal"]


def test_mixtral_on_disk_layout_is_the_hubs(ckpts):
    keys = set(load_file(f"{ckpts['mixtral']['hf']}/model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys


def test_olmoe_full_width_qk_norm_under_tp(runs):
    got = [r["qk_norm_tp"] for r in runs if "qk_norm_tp" in r]
    assert len(got) == 2 and all(q["tp"] == 2 for q in got)
    for q in got:
        assert max(q["y"], q["dx"], q["dw"]) < 1e-5, q


def test_every_parameter_assigned(runs):
    none = {r["family"]: r["n_params"] for r in runs if r["layout"] == "none" and r["rank"] == 0}
    # 4 layers; per layer 2 norms + qkv + proj; MoE: router + 4 x (fc1, fc2); + emb/out/final
    assert none["mixtral"] == 4 * (4 + 1 + 8) + 3
    assert none["olmoe"] == 4 * (4 + 2 + 1 + 8) + 3  # + q/k norm
    # + qkv bias; 3 MoE layers (+ shared fc1, fc2, gate) and 1 dense layer (fc1, fc2)
    assert none["qwen2_moe"] == 3 * (5 + 1 + 8 + 3) + (5 + 2) + 3


# ------------------------------------------------------------------------------ refusals


def _cfg(family: str, **edit) -> dict:
    import transformers

    cls, _, extra = FAMILIES[family]
    return {**getattr(transformers, cls)(**SHAPE, **extra).to_dict(), **edit}


def test_unsupported_architecture_lists_the_supported_ones():
    from megatron_rl.models import FAMILIES, ModelOptions, transformer_config_from_hf

    with pytest.raises(ValueError) as e:
        transformer_config_from_hf({"model_type": "gpt_oss"}, ModelOptions())
    assert "gpt_oss" in str(e.value)
    assert {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe"} <= set(FAMILIES)
    for name in FAMILIES:
        assert repr(name) in str(e.value)


@pytest.mark.parametrize("family,edit,needle", [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
    ("mixtral", dict(sliding_window=4096), "sliding_window=4096"),
    ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("mixtral", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "'yarn'"),
])
def test_unsupported_features_are_refused(family, edit, needle):
    from megatron_rl.models import ModelOptions, transformer_config_from_hf

    with pytest.raises(ValueError, match=family) as e:
        transformer_config_from_hf(_cfg(family, **edit), ModelOptions())
    assert needle in str(e.value)


def test_olmoe_refuses_tp_that_splits_key_heads():
    from megatron_rl.models import ModelOptions, transformer_config_from_hf

    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        transformer_config_from_hf(_cfg("olmoe"), ModelOptions(), tp=4)


def test_configs_read_back_from_disk(ckpts):
    """config.json as transformers 5 writes it maps to the intended Megatron fields."""
    from megatron_rl.models import (ModelOptions, get_family, load_hf_config,
                                    transformer_config_from_hf)

    hf = {f: load_hf_config(ckpts[f]["hf"]) for f in FAMILIES}
    cfgs = {f: transformer_config_from_hf(hf[f], ModelOptions()) for f in FAMILIES}
    assert not cfgs["mixtral"].moe_router_pre_softmax  # renormalised top-k
    assert cfgs["olmoe"].moe_router_pre_softmax and cfgs["olmoe"].qk_layernorm
    q2 = cfgs["qwen2_moe"]
    assert q2.add_qkv_bias and q2.moe_shared_expert_gate and not q2.qk_layernorm
    assert q2.moe_shared_expert_intermediate_size == 48 and q2.moe_layer_freq == [1, 1, 0, 1]
    assert get_family(hf["mixtral"]).gpt_kwargs(hf["mixtral"])["rotary_base"] == 10**6
    assert all(c.num_query_groups == 2 and c.kv_channels == 16 for c in cfgs.values())


def test_qwen2_moe_rules_follow_the_config():
    """No q/k/v-bias or shared-expert rules when the config has none, so such tensors in a
    checkpoint are reported as unexpected rather than skipped."""
    from megatron_rl.checkpoint import get_adapter

    rules_for = get_adapter({"model_type": "qwen2_moe"}).rules_for
    full = {r.megatron for r in rules_for(set(), {})[0]}
    bare = {r.megatron for r in rules_for(set(), {"qkv_bias": False,
                                                  "shared_expert_intermediate_size": 0})[0]}
    assert {n.split(".", 3)[-1] for n in full - bare} == {
        "self_attention.linear_qkv.bias", "mlp.shared_experts.linear_fc1.weight",
        "mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.gate_weight"}
