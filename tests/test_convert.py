"""tools/convert.py, checkpoint.mcore_io and checkpoint.export against the HF input files and HF
transformers' logits as the references.

Two launches (the machine has 2 cores): a 1-rank one runs the tool's ``main`` (HF -> mcore -> HF
round trip, and the error cases), a 2-rank one runs the tool under 2 ranks (hf-to-mcore --ep 2,
mcore-to-hf --tp 2) and then, per layout (TP2+SP, EP2, PP2), loads a dist checkpoint written by
another layout, compares the logits with transformers and streams the HF export.
The source checkpoint is the tiny model with every weight re-drawn (norms included, so a swapped
tensor cannot hide) and written as 3 shards + index in the hub's per-expert layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_checkpoint_qwen3 import _build, _forward, _write_sharded

TOL = 1e-4
B, S = 2, 12
BUCKET = 150_000  # bytes; the tiny model's embedding / lm_head (196,608 B) exceed it
LAYOUTS = [  # (name, ParallelConfig kwargs, checkpoint to load, fused export)
    ("tp2_sp", dict(tp=2, sequence_parallel=True), "mc1", False),
    ("ep2", dict(ep=2), "mc_ep2", True),
    ("pp2", dict(pp=2), "mc_ep2", False),
]
META = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _read_hf(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_bytes_equal(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:10]}"
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {k} {g.shape} vs {w.shape}"
        assert g.contiguous().numpy().tobytes() == w.numpy().tobytes(), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def src(tiny_hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "src"
    out.mkdir()
    for n in META:
        shutil.copy(Path(tiny_hf_dir) / n, out / n)
    sd = load_file(Path(tiny_hf_dir) / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, t in sd.items():
        noise = torch.randn(t.shape, generator=g)
        sd[k] = 1 + 0.2 * noise if t.dim() == 1 else 0.05 * noise
    _write_sharded(sd, out, 3)
    return out


@pytest.fixture(scope="module")
def reference(src):
    """HF logits for 2 batches ([2, B, S] ids) and transformers' fused in-memory state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, B, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = torch.stack([model(x).logits for x in ids])
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}
    return ids, logits, fused


# ------------------------------------------------------------------------------ 1 rank


def _expect_error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def _one_rank(rank: int, world: int, src: str, root: str) -> dict:
    import megatron.core.dist_checkpointing as dcp
    import safetensors.torch

    from conftest import load_tool

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    main = load_tool("convert").main
    r = Path(root)
    main(["hf-to-mcore", "--hf", src, "--out", str(r / "mc1")])
    main(["mcore-to-hf", "--ckpt", str(r / "mc1"), "--out", str(r / "hf1"),
          "--max-shard-size", "3MB"])
    errors = {}
    (r / "exists").mkdir()
    (r / "exists" / "keep.txt").write_text("keep")
    errors["exists"] = _expect_error(lambda: main(["hf-to-mcore", "--hf", src, "--out",
                                                   str(r / "exists")]))
    errors["exists_hf"] = _expect_error(lambda: main(["mcore-to-hf", "--ckpt", str(r / "mc1"),
                                                      "--out", str(r / "exists")]))
    for name, edit in (("trunc", _truncate), ("bad_keys", _bad_keys), ("arch", _bad_arch)):
        shutil.copytree(src, r / name)
        edit(r / name)
        errors[name] = _expect_error(lambda: main(["hf-to-mcore", "--hf", str(r / name),
                                                   "--out", str(r / f"{name}_out")]))
    calls = []

    def failing_save(*args, **kwargs):  # the 2nd shard write dies
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    real_save, safetensors.torch.save_file = safetensors.torch.save_file, failing_save
    errors["interrupted_hf"] = _expect_error(lambda: main([
        "mcore-to-hf", "--ckpt", str(r / "mc1"), "--out", str(r / "hf_int"),
        "--max-shard-size", "3MB"]))
    safetensors.torch.save_file = real_save
    real_dcp_save = dcp.save
    dcp.save = lambda *a, **k: (_ for _ in ()).throw(OSError("killed (simulated)"))
    errors["interrupted_mc"] = _expect_error(lambda: main(["hf-to-mcore", "--hf", src, "--out",
                                                           str(r / "mc_int")]))
    dcp.save = real_dcp_save
    torch.distributed.destroy_process_group()
    return errors


def _truncate(d: Path) -> None:
    f = d / "model-00002-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _bad_keys(d: Path) -> None:
    sd = _read_hf(d)
    sd.pop("model.layers.1.self_attn.q_norm.weight")
    sd["model.layers.9.mlp.gate.weight"] = torch.zeros(8, 128)
    for f in d.glob("model*"):
        f.unlink()
    _write_sharded(sd, d, 2)


def _bad_arch(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama4_text", architectures=["Llama4ForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def one_rank(src, tmp_path_factory):
    from megatron_rl.testing import run_distributed

    root = tmp_path_factory.mktemp("w1")
    errors = run_distributed(_one_rank, 1, str(src), str(root))[0]
    return root, errors


def test_round_trip_is_byte_identical(src, one_rank):
    root, _ = one_rank
    out = root / "hf1"
    _assert_bytes_equal(_read_hf(out), _read_hf(src), "hf -> mcore -> hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert all(os.path.getsize(out / s) <= 3e6 + 10_000 for s in shards)  # + header
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _read_hf(src).values())
    for n in META:  # config + tokenizer via <mc1>/hf_meta
        assert (out / n).read_bytes() == (src / n).read_bytes(), n
    from megatron_rl.checkpoint.mcore_io import read_hf_config

    assert read_hf_config(str(root / "mc1")) == json.loads((src / "config.json").read_text())


def test_existing_output_is_refused_and_untouched(one_rank):
    root, errors = one_rank
    for case in ("exists", "exists_hf"):
        assert errors[case].startswith("FileExistsError") and str(root / "exists") in errors[case]
        assert "--overwrite" in errors[case]
    assert [p.name for p in (root / "exists").iterdir()] == ["keep.txt"]
    assert (root / "exists" / "keep.txt").read_text() == "keep"


def test_bad_inputs_name_the_problem(one_rank):
    root, errors = one_rank
    assert "SafetensorsReadError" in errors["trunc"], errors["trunc"]
    assert str(root / "trunc" / "model-00002-of-00003.safetensors") in errors["trunc"]
    for needle in ("decoder.layers.1.self_attention.q_layernorm.weight",
                   "model.layers.1.self_attn.q_norm.weight not in checkpoint", "unexpected",
                   "model.layers.9.mlp.gate.weight"):
        assert needle in errors["bad_keys"], f"{needle!r} not in {errors['bad_keys']}"
    from megatron_rl.models import FAMILIES

    assert "llama4_text" in errors["arch"] and f"supported: {sorted(FAMILIES)}" in errors["arch"]
    for name in ("trunc", "bad_keys", "arch"):
        assert not (root / f"{name}_out").exists()


def test_interrupted_conversion_leaves_nothing(one_rank):
    root, errors = one_rank
    assert "disk full (simulated)" in errors["interrupted_hf"], errors["interrupted_hf"]
    assert "killed (simulated)" in errors["interrupted_mc"], errors["interrupted_mc"]
    names = sorted(p.name for p in root.iterdir())
    assert "hf_int" not in names and "mc_int" not in names
    assert not [n for n in names if ".tmp" in n or ".old" in n], names


# ------------------------------------------------------------------------------ 2 ranks


def _two_ranks(rank: int, world: int, src: str, root: str, ids: torch.Tensor) -> list[dict]:
    from megatron.core import parallel_state as ps

    from conftest import load_tool
    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.checkpoint.mcore_io import load_model_checkpoint
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    main, r = load_tool("convert").main, Path(root)
    main(["hf-to-mcore", "--hf", src, "--out", str(r / "mc_ep2"), "--ep", "2"])
    main(["mcore-to-hf", "--ckpt", str(r / "mc1"), "--out", str(r / "hf_tp2"), "--tp", "2"])
    results = []
    for name, kwargs, ckpt, fused in LAYOUTS:
        pc = ParallelConfig(**kwargs)
        init_parallel(pc, device="cpu")
        model = _build(pc, src)
        hf_config = load_model_checkpoint(model, str(r / ckpt))
        res = dict(layout=name, rank=rank, dp_rank=ps.get_data_parallel_rank(), fused=fused)
        logits = _forward(model, ids[res["dp_rank"]])
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            res["logits"] = logits
        buckets = list(iter_hf_tensors(model, hf_config, bucket_bytes=BUCKET,
                                       fused_experts=fused))
        res["buckets"] = [{k: (t.numel() * t.element_size()) for k, t in b.items()}
                          for b in buckets]
        res["export"] = {k: t for b in buckets for k, t in b.items()}
        results.append(res)
        destroy_parallel(keep_process_group=True)
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def two_ranks(src, one_rank, reference):
    from megatron_rl.testing import run_distributed

    root, _ = one_rank
    per_rank = run_distributed(_two_ranks, 2, str(src), str(root), reference[0])
    return root, [r for rank_results in per_rank for r in rank_results]


def test_tool_under_two_ranks_round_trips(src, two_ranks):
    root, _ = two_ranks
    _assert_bytes_equal(_read_hf(root / "hf_tp2"), _read_hf(src), "mc1 -> hf at tp2")
    assert (root / "mc_ep2" / "hf_meta" / "tokenizer.json").exists()


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_loaded_checkpoint_matches_hf_logits(two_ranks, reference, layout):
    _, runs = two_ranks
    _, ref, _ = reference
    got = [r for r in runs if r["layout"] == layout and "logits" in r]
    assert got, f"{layout}: no rank returned logits"
    for r in got:
        want = ref[r["dp_rank"]]
        err = (r["logits"][..., :want.shape[-1]] - want).abs().max().item()
        assert err < TOL, f"{layout} dp_rank {r['dp_rank']}: max |logits - HF| = {err:.2e}"


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_streaming_export_is_exact_and_bounded(src, two_ranks, reference, layout):
    _, runs = two_ranks
    rank0, rank1 = sorted((r for r in runs if r["layout"] == layout), key=lambda r: r["rank"])
    assert rank1["buckets"] == [] and rank1["export"] == {}
    want = reference[2] if rank0["fused"] else _read_hf(src)
    _assert_bytes_equal(rank0["export"], want, f"{layout} export")
    assert len(rank0["buckets"]) > 3
    for b in rank0["buckets"]:
        assert sum(b.values()) <= BUCKET or len(b) == 1, f"{layout}: bucket {b} too large"
