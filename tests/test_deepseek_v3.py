"""DeepSeek-V3 (MLA + sigmoid/expert-bias group-limited MoE) against HF transformers.

Reference: ``DeepseekV3ForCausalLM`` (fp32, eager) on a tiny random checkpoint in which every
weight, every norm and ``e_score_correction_bias`` is re-drawn (the bias large enough that routing
depends on it -- checked). One 2-rank gloo launch runs the layouts in turn: none (2 DP ranks,
different batches), TP2 + sequence parallel (experts ETP2), EP2 (alltoall), PP2 (1F1B). The
unsharded layout also checks: ``q_lora_rank=None`` (direct ``q_proj``), YaRN rope scaling,
a checkpoint with MTP layers (ignored), the stacked-expert layout, the export round trip and a
missing-bias error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from _parity import forward_per_sample, stream_hf

TOL = 1e-4
V, B, S = 300, 2, 12
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=4, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, max_position_embeddings=64, tie_word_embeddings=False)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
            beta_fast=32.0, beta_slow=1.0, mscale=0.8, mscale_all_dim=1.0)
VARIANTS = {"hf": {}, "qdirect": dict(q_lora_rank=None), "yarn": dict(rope_parameters=YARN)}
LAYOUTS = [("none", {}), ("tp2_sp", dict(tp=2, sequence_parallel=True)), ("ep2", dict(ep=2)),
           ("pp2", dict(pp=2))]
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


# ------------------------------------------------------------------------------ checkpoints


def _make(out: Path, seed: int, **overrides) -> Path:
    """save_pretrained of a random tiny DeepseekV3ForCausalLM with every tensor re-drawn."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.5 * noise)  # sigmoid scores are in (0, 1): this reorders the top-k
            else:
                t.copy_(1 + 0.2 * noise if t.dim() == 1 else 0.1 * noise)
    model.save_pretrained(out)
    return out


def _edit(src: Path, dst: Path, edit) -> Path:
    """Copy of ``src`` with its state dict edited by ``edit(sd, config) -> None``."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd, cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _add_mtp(sd: dict, cfg: dict) -> None:
    """Hub-style MTP layer ``model.layers.{num_hidden_layers}.*`` (plus its eh_proj / norms)."""
    n = cfg["num_hidden_layers"]
    for k in [k for k in sd if k.startswith(f"model.layers.{n - 1}.")]:
        sd[k.replace(f"layers.{n - 1}.", f"layers.{n}.")] = sd[k].clone()
    sd[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    cfg["num_nextn_predict_layers"] = 1


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv3")
    dirs = {name: _make(root / name, seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}
    dirs["mtp"] = _edit(dirs["hf"], root / "mtp", _add_mtp)
    dirs["no_bias"] = _edit(dirs["hf"], root / "no_bias", lambda sd, cfg: sd.pop(BIAS))
    dirs["zero_bias"] = _edit(dirs["hf"], root / "zero_bias", lambda sd, cfg: [
        t.zero_() for k, t in sd.items() if k.endswith("e_score_correction_bias")])
    return dirs


@pytest.fixture(scope="module")
def reference(ckpts):
    """HF logits ([2, B, S, V], one batch per DP rank) per checkpoint; writes transformers'
    in-memory state dict (stacked experts) as the "fused" checkpoint."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, V, (2, B, S), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name in ("hf", "qdirect", "yarn", "zero_bias"):
        model = AutoModelForCausalLM.from_pretrained(ckpts[name], dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            logits[name] = torch.stack([model(x).logits for x in ids])
        if name == "hf":
            fused = {k: v.contiguous() for k, v in model.state_dict().items()}
            assert "model.layers.1.mlp.experts.gate_up_proj" in fused
            ckpts["fused"] = _edit(ckpts["hf"], ckpts["hf"].parent / "fused",
                                   lambda sd, cfg: (sd.clear(), sd.update(fused)))
    return ids, logits


# ------------------------------------------------------------------------------ the ranks


_forward = forward_per_sample


def _build(pc, hf_dir):
    from megatron.core import parallel_state as ps

    from megatron_rl.models import (ModelOptions, build_model, load_hf_config,
                                    transformer_config_from_hf)

    hf_cfg = load_hf_config(hf_dir)
    opts = ModelOptions(sequence_parallel=pc.sequence_parallel)
    cfg = transformer_config_from_hf(hf_cfg, opts, tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
    return build_model(hf_cfg, cfg, pre_process=ps.is_pipeline_first_stage(),
                       post_process=ps.is_pipeline_last_stage()).eval()


def _extras(pc, dirs: dict, ids: torch.Tensor, model) -> dict:
    """Unsharded-only checks: variants' logits, export, fused / MTP loads, missing bias."""
    from megatron_rl.checkpoint import CheckpointError, export_hf_state_dict, load_hf_weights

    out = {"export": export_hf_state_dict(model, dirs["hf"]),
           "export_fused": export_hf_state_dict(model, dirs["hf"], fused_experts=True)}
    tensors = lambda: [*model.named_parameters(), *model.named_buffers()]  # noqa: E731
    before = {n: t.detach().clone() for n, t in tensors()}
    same = lambda: all(torch.equal(before[n], t) for n, t in tensors())  # noqa: E731
    try:
        load_hf_weights(model, dirs["no_bias"])
        out["no_bias_error"] = None
    except CheckpointError as e:
        out["no_bias_error"] = str(e)
    out["untouched"] = same()
    for name in ("fused", "mtp"):
        load_hf_weights(model, dirs[name])
        out[f"{name}_equal"] = same()
    for name in ("qdirect", "yarn", "zero_bias"):
        m = _build(pc, dirs[name])
        load_hf_weights(m, dirs[name])
        out[f"logits_{name}"] = _forward(m, ids)
    return out


def _worker(rank: int, world: int, dirs: dict, ids: torch.Tensor) -> list[dict]:
    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint import load_hf_weights
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel

    results = []
    for name, kwargs in LAYOUTS:
        t0 = time.perf_counter()
        pc = ParallelConfig(**kwargs)
        init_parallel(pc, device="cpu")
        model = _build(pc, dirs["hf"])
        n_tensors = load_hf_weights(model, dirs["hf"])
        dp_rank = ps.get_data_parallel_rank()
        logits = _forward(model, ids[dp_rank])
        res = dict(layout=name, rank=rank, dp_rank=dp_rank, n_tensors=n_tensors)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            res["logits"] = logits
        if name == "none":
            res.update(_extras(pc, dirs, ids[dp_rank], model))
        streamed = stream_hf(model, dirs["hf"])  # collective; tensors land on rank 0
        if rank == 0:
            res["streamed"] = streamed
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        ps.destroy_model_parallel()
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def runs(ckpts, reference):
    from megatron_rl.testing import run_distributed

    ids, _ = reference
    per_rank = run_distributed(_worker, 2, {k: str(v) for k, v in ckpts.items()}, ids)
    return [r for rank_results in per_rank for r in rank_results]


# ------------------------------------------------------------------------------ the tests


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape[-1] >= V and got.shape[:2] == want.shape[:2]
    return (got[..., :V] - want).abs().max().item()


def test_routing_depends_on_expert_bias(reference):
    _, ref = reference
    assert (ref["hf"] - ref["zero_bias"]).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_logits_match_hf(runs, reference, layout):
    _, ref = reference
    got = [r for r in runs if r["layout"] == layout and "logits" in r]
    assert got, f"{layout}: no rank returned logits"
    for r in got:
        err = _err(r["logits"], ref["hf"][r["dp_rank"]])
        assert err < TOL, f"{layout} dp_rank {r['dp_rank']}: max |logits - HF| = {err:.2e}"
    assert {r["dp_rank"] for r in got} == ({0, 1} if layout in ("none", "ep2") else {0})


@pytest.mark.parametrize("variant", ["qdirect", "yarn", "zero_bias"])
def test_variant_logits_match_hf(runs, reference, variant):
    _, ref = reference
    for r in (r for r in runs if r["layout"] == "none"):
        err = _err(r[f"logits_{variant}"], ref[variant][r["dp_rank"]])
        assert err < TOL, f"{variant} dp_rank {r['dp_rank']}: max |logits - HF| = {err:.2e}"


def _none0(runs) -> dict:
    return next(r for r in runs if r["layout"] == "none" and r["rank"] == 0)


def test_export_round_trip_is_byte_identical(runs, ckpts):
    extras = _none0(runs)
    for key, src in (("export", "hf"), ("export_fused", "fused")):
        want = load_file(ckpts[src] / "model.safetensors")
        got = extras[key]
        assert set(got) == set(want), set(got) ^ set(want)
        assert BIAS in got
        for k, w in want.items():
            assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
            assert got[k].numpy().tobytes() == w.numpy().tobytes(), k


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_streaming_export_is_byte_identical(runs, ckpts, layout):
    """iter_hf_tensors from every layout (TP2+SP, EP2, PP2) reproduces the checkpoint,
    including the router's e_score_correction_bias (a Megatron buffer, not a parameter)."""
    got = next(r for r in runs if r["layout"] == layout and r["rank"] == 0)["streamed"]
    assert got, layout
    want = load_file(ckpts["hf"] / "model.safetensors")
    assert set(got) == set(want), set(got) ^ set(want)
    assert BIAS in got
    for k, w in want.items():
        assert got[k].numpy().tobytes() == w.numpy().tobytes(), k


def test_other_layouts_load_the_same_tensors(runs):
    extras = _none0(runs)
    assert extras["fused_equal"], "stacked-expert checkpoint loaded different weights"
    assert extras["mtp_equal"], "checkpoint with MTP layers loaded different weights"
    # 4 layers (1 dense): 9 attention + norm tensors each, dense fc1/fc2, 3 MoE x (router +
    # bias + shared fc1/fc2 + 8 experts x 2), embedding / output / final norm
    assert extras["n_tensors"] == 4 * 9 + 2 + 3 * (2 + 2 + 16) + 3


def test_missing_bias_is_named(runs):
    extras = _none0(runs)
    msg = extras["no_bias_error"]
    assert msg is not None, "load without e_score_correction_bias did not raise"
    assert "decoder.layers.1.mlp.router.expert_bias" in msg and BIAS in msg
    assert extras["untouched"], "a failed load modified the model"


def test_config_mapping_of_hub_fields():
    """Hub config.json spelling (``rope_scaling`` + ``rope_theta``) and the refusals."""
    from megatron_rl.models.deepseek_v3 import check_parallel, config_kwargs

    hub = {**TINY, "model_type": "deepseek_v3", "rope_theta": 5e4, "topk_method": "noaux_tc",
           "scoring_func": "sigmoid", "rope_scaling": {
               "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    kw = config_kwargs(hub)
    assert (kw["rope_type"], kw["rotary_base"], kw["rotary_scaling_factor"]) == ("yarn", 5e4, 40)
    assert (kw["mscale"], kw["mscale_all_dim"], kw["original_max_position_embeddings"]) == (
        1.0, 1.0, 4096)
    assert kw["moe_layer_freq"] == [0, 1, 1, 1] and kw["moe_shared_expert_intermediate_size"] == 16
    assert (kw["moe_router_num_groups"], kw["moe_router_group_topk"]) == (4, 2)
    assert kw["moe_router_topk_scaling_factor"] == 2.5 and kw["moe_router_enable_expert_bias"]
    for bad in (dict(norm_topk_prob=False), dict(rope_interleave=False), dict(topk_group=1),
                dict(hidden_act="gelu")):
        with pytest.raises(ValueError):
            config_kwargs({**hub, **bad})
    check_parallel(hub, dict(tp=4))  # heads 4, kv_lora_rank + rope 32, q_lora_rank 32
    with pytest.raises(ValueError, match="q_lora_rank=32"):
        check_parallel({**hub, "num_attention_heads": 6}, dict(tp=6))
