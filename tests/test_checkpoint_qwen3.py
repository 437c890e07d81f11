"""megatron_rl.checkpoint (Qwen3-MoE) against HF transformers as the reference.

One 2-rank gloo launch (the machine has 2 cores) runs every parallel layout in turn -- none,
TP2+SP (experts ETP2), EP2 (alltoall, 2 DP ranks with different batches), TP2+EP2+ETP1+SP,
PP2 (Megatron's 1F1B schedule), PP2 with tied embeddings -- and each is compared with
Qwen3MoeForCausalLM (fp32, eager) on the same checkpoint. The non-parallel layout also runs the
export round trip, the fused-expert layout and the error cases. All weights, norms included, are
re-drawn at random so that a swapped or transposed tensor cannot hide behind an all-ones init.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from _parity import forward_per_sample
from conftest import load_tool

TOL = 1e-4
V = 300  # not a multiple of 128: exercises vocab padding
TINY = dict(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, intermediate_size=96, mlp_only_layers=[2])
B, S = 2, 12
# (name, ParallelConfig kwargs, checkpoint)
LAYOUTS = [
    ("none", {}, "hf"),
    ("tp2_sp", dict(tp=2, sequence_parallel=True), "hf"),
    ("ep2", dict(ep=2), "hf"),
    ("tp2_ep2_etp1_sp", dict(tp=2, ep=2, etp=1, sequence_parallel=True), "hf"),
    ("pp2", dict(pp=2), "hf"),
    ("none_tied", {}, "tied"),
    ("pp2_tied", dict(pp=2), "tied"),
]
BAD = {  # name -> (edit of the state dict, strings the error must contain)
    "missing": (lambda sd: sd.pop("model.layers.1.self_attn.k_norm.weight"),
                ["no HF source", "decoder.layers.1.self_attention.k_layernorm.weight",
                 "model.layers.1.self_attn.k_norm.weight not in checkpoint"]),
    "unexpected": (lambda sd: sd.update({
        "model.layers.4.self_attn.q_proj.weight": torch.zeros(64, 64),
        "model.layers.2.mlp.experts.0.up_proj.weight": torch.zeros(32, 64)}),
        ["unexpected", "model.layers.4.self_attn.q_proj.weight",
         "model.layers.2.mlp.experts.0.up_proj.weight"]),
    "shape": (lambda sd: sd.update({"model.norm.weight": torch.ones(63),
                                    "model.layers.0.self_attn.k_proj.weight": torch.ones(48, 64)}),
              ["shape mismatches", "decoder.final_layernorm.weight: expected [64], got [63]",
               "model.norm.weight [63]", "model.layers.0.self_attn.k_proj.weight [48, 64]",
               "decoder.layers.0.self_attention.linear_qkv.weight: expected [128, 64]"]),
}


# ------------------------------------------------------------------------------ checkpoints


def _make_tiny():
    return load_tool("make_tiny_model").make_tiny_model


def _write_sharded(sd: dict, out: Path, n_files: int = 3) -> None:
    """HF sharded layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    keys, weight_map = sorted(sd), {}
    for i in range(n_files):
        fn = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n_files]}
        save_file(part, out / fn, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fn))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def _variant(src: Path, dst: Path, sd: dict, **config) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = _make_tiny()(root / "hf", seed=0, **TINY)
    sd = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, t in sd.items():  # norms around 1, matrices ~0.1: every weight distinguishable
        noise = torch.randn(t.shape, generator=g)
        sd[k] = 1 + 0.2 * noise if t.dim() == 1 else 0.1 * noise
    (base / "model.safetensors").unlink()
    _write_sharded(sd, base)
    dirs = {"hf": base}
    tied = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    dirs["tied"] = _variant(base, root / "tied", tied, tie_word_embeddings=True)
    for name, (edit, _) in BAD.items():
        bad = dict(sd)
        edit(bad)
        dirs[name] = _variant(base, root / name, bad)
    return dirs


@pytest.fixture(scope="module")
def reference(ckpts):
    """HF logits per checkpoint for two batches ([2, B, S] ids); writes transformers' own
    fused-expert state dict (its in-memory layout) as the "fused" checkpoint."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, V, (2, B, S), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name in ("hf", "tied"):
        model = AutoModelForCausalLM.from_pretrained(ckpts[name], dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            logits[name] = torch.stack([model(x).logits for x in ids])
        if name == "hf":
            fused = {k: v.contiguous() for k, v in model.state_dict().items()}
            assert "model.layers.0.mlp.experts.gate_up_proj" in fused
            ckpts["fused"] = _variant(ckpts["hf"], ckpts["hf"].parent / "fused", fused)
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


def _extras(model, dirs: dict) -> dict:
    """Round trip, fused layout and error cases on the unsharded model (rank 0)."""
    from megatron_rl.checkpoint import CheckpointError, export_hf_state_dict, load_hf_weights

    out = {"export": export_hf_state_dict(model, dirs["hf"]),
           "export_fused": export_hf_state_dict(model, dirs["hf"], fused_experts=True),
           "pad_rows": model.embedding.word_embeddings.weight[V:].abs().max().item()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["errors"] = {}
    for name in BAD:
        try:
            load_hf_weights(model, dirs[name])
            out["errors"][name] = None
        except CheckpointError as e:
            out["errors"][name] = str(e)
    out["untouched"] = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    load_hf_weights(model, dirs["fused"])
    out["fused_equal"] = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    return out


def _cpu_gap(layout: str, pc) -> str | None:
    """Why this layout cannot run on the CPU backend yet (None if it can). Both ranks decide
    alike, so a skipped layout never leaves a rank alone in a collective."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    fn = LanguageModule.setup_embeddings_and_output_layer
    if layout.endswith("_tied") and pc.pp > 1 and not fn.__code__.co_filename.startswith(
            "<megatron_rl.device"):
        return ("LanguageModule.setup_embeddings_and_output_layer calls weight.data.cuda() for "
                "tied embeddings with pp > 1; megatron_rl.device does not rewrite it yet")
    return None


def _worker(rank: int, world: int, dirs: dict, ids: torch.Tensor) -> list[dict]:
    import time

    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint import load_hf_weights
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel

    results = []
    for name, kwargs, ckpt in LAYOUTS:
        t0 = time.perf_counter()
        pc = ParallelConfig(**kwargs)
        init_parallel(pc, device="cpu")
        if gap := _cpu_gap(name, pc):
            results.append(dict(layout=name, skipped=gap))
            ps.destroy_model_parallel()
            continue
        model = _build(pc, dirs[ckpt])
        n_params = load_hf_weights(model, dirs[ckpt])
        dp_rank = ps.get_data_parallel_rank()
        logits = _forward(model, ids[dp_rank])
        res = dict(layout=name, ckpt=ckpt, rank=rank, dp_rank=dp_rank, n_params=n_params)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            res["logits"] = logits
        if name == "none" and rank == 0:
            res.update(_extras(model, dirs))
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        ps.destroy_model_parallel()  # keep the gloo group; next layout re-inits Megatron's
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def runs(ckpts, reference):
    from megatron_rl.testing import run_distributed

    ids, _ = reference
    per_rank = run_distributed(_worker, 2, {k: str(v) for k, v in ckpts.items()}, ids)
    return [r for rank_results in per_rank for r in rank_results]


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("layout", [name for name, _, _ in LAYOUTS])
def test_logits_match_hf(runs, reference, layout):
    _, ref = reference
    if skipped := [r["skipped"] for r in runs if r["layout"] == layout and "skipped" in r]:
        pytest.skip(skipped[0])
    got = [r for r in runs if r["layout"] == layout and "logits" in r]
    assert got, f"{layout}: no rank returned logits"
    for r in got:
        want = ref[r["ckpt"]][r["dp_rank"]]
        assert r["logits"].shape[-1] >= V and r["logits"].shape[:2] == want.shape[:2]
        err = (r["logits"][..., :V] - want).abs().max().item()
        assert err < TOL, f"{layout} dp_rank {r['dp_rank']}: max |logits - HF| = {err:.2e}"
    assert {r["dp_rank"] for r in got} == ({0, 1} if layout in ("none", "ep2", "none_tied")
                                           else {0})


def _rank0_extras(runs) -> dict:
    return next(r for r in runs if r["layout"] == "none" and r["rank"] == 0)


def test_export_round_trip_is_byte_identical(runs, ckpts):
    extras = _rank0_extras(runs)
    index = json.loads((ckpts["hf"] / "model.safetensors.index.json").read_text())["weight_map"]
    exported = extras["export"]
    assert set(exported) == set(index)
    for key, fn in index.items():
        with safe_open(ckpts["hf"] / fn, "pt") as f:
            want = f.get_tensor(key)
        got = exported[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.numpy().tobytes() == want.numpy().tobytes(), key
    fused = load_file(ckpts["fused"] / "model.safetensors")
    assert set(extras["export_fused"]) == set(fused)
    for key, want in fused.items():
        assert torch.equal(extras["export_fused"][key], want), key
    assert extras["pad_rows"] == 0.0  # padded vocab rows are zeros


def test_fused_expert_layout_loads_the_same_weights(runs):
    assert _rank0_extras(runs)["fused_equal"]


@pytest.mark.parametrize("case", list(BAD))
def test_errors_name_the_tensors(runs, case):
    extras = _rank0_extras(runs)
    msg = extras["errors"][case]
    assert msg is not None, f"{case}: load did not raise"
    for needle in BAD[case][1]:
        assert needle in msg, f"{case}: {needle!r} not in\n{msg}"
    assert extras["untouched"], "a failed load modified the model"


def test_every_parameter_assigned(runs):
    for r in runs:
        assert "skipped" in r or r["n_params"] > 0
    none = [r for r in runs if r["layout"] == "none"]
    # 4 layers: 3 MoE (norms, qkv, proj, q/k norm, router, 4x fc1/fc2) + 1 dense, emb/out/final
    assert none[0]["n_params"] == 3 * (7 + 8) + (6 + 2) + 3
