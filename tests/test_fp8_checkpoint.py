"""``tools/convert.py mcore-to-hf --fp8 block128`` and the embedded engine's FP8 loading, against an
independent reader written here (plain safetensors + float64 per-block dequantisation) and, when
``accelerate`` is installed, HF transformers' own FineGrainedFP8 loader (CPU: dequantises).

The source is the tiny model with every weight re-drawn (so a swapped tensor cannot hide)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_convert import META, _read_hf


def _convert(rank: int, world: int, src: str, root: str) -> None:
    from conftest import load_tool

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    main = load_tool("convert").main
    main(["hf-to-mcore", "--hf", src, "--out", f"{root}/mc"])
    main(["mcore-to-hf", "--ckpt", f"{root}/mc", "--out", f"{root}/fp8", "--fp8", "block128",
          "--max-shard-size", "2MB"])
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def src(tiny_hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8src") / "src"
    out.mkdir()
    for n in META:
        shutil.copy(Path(tiny_hf_dir) / n, out / n)
    sd = load_file(Path(tiny_hf_dir) / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, t in sd.items():
        noise = torch.randn(t.shape, generator=g)
        sd[k] = 1 + 0.2 * noise if t.dim() == 1 else 0.05 * noise * torch.exp(torch.randn(t.shape, generator=g))
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def fp8_dir(src, tmp_path_factory) -> Path:
    from megatron_rl.testing import run_distributed

    root = tmp_path_factory.mktemp("fp8conv")
    run_distributed(_convert, 1, str(src), str(root))
    return root / "fp8"


def _ref_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 q * s with explicit loops over the 128x128 block grid."""
    out = q.double().clone()
    n, k = q.shape
    assert tuple(s.shape) == (math.ceil(n / 128), math.ceil(k / 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= float(s[i, j])
    return out


def _independent_read(d: Path) -> dict[str, torch.Tensor]:
    raw = _read_hf(d)
    out = {}
    for k, t in raw.items():
        if k.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[k] = _ref_dequant(t, raw[k + "_scale_inv"])
        else:
            out[k] = t.double()
    return out


def test_config_and_tensors(src, fp8_dir):
    cfg = json.loads((fp8_dir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert cfg == json.loads((src / "config.json").read_text())
    routers = {f"model.layers.{i}.mlp.gate" for i in range(cfg["num_hidden_layers"])}
    assert set(qc["modules_to_not_convert"]) == routers | ({"lm_head"} if not cfg["tie_word_embeddings"] else set())
    raw, want = _read_hf(fp8_dir), _read_hf(src)
    expected_fp8 = {k for k in want if k.endswith("_proj.weight")}  # q/k/v/o, expert gate/up/down
    assert {k for k, t in raw.items() if t.dtype == torch.float8_e4m3fn} == expected_fp8
    assert set(raw) == set(want) | {k + "_scale_inv" for k in expected_fp8}
    for k, w in want.items():
        if k in expected_fp8:
            assert raw[k + "_scale_inv"].dtype == torch.float32
        else:
            assert torch.equal(raw[k], w), k  # kept tensors are untouched
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded; weights and scales indexed
    assert set(index["weight_map"]) == set(raw)


def test_independent_reader_equals_engine_weights(src, fp8_dir):
    from megatron_rl.rollout.engine.model_runner import ModelRunner

    ref = _independent_read(fp8_dir)
    want = _read_hf(src)
    for k, w in want.items():  # the dequantised weights are the source within the e4m3 bound
        assert ((ref[k] - w.double()).abs() <= w.double().abs() * 2 ** -4 + 1e-3 * w.abs().max()).all(), k
    runner = ModelRunner(str(fp8_dir), dtype="float32")
    sd = runner.model.state_dict()
    n_exp = runner.model.config.num_experts
    for key, t in sd.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            p = key[: -len("gate_up_proj")]
            exp = torch.stack([torch.cat([ref[f"{p}{e}.gate_proj.weight"], ref[f"{p}{e}.up_proj.weight"]])
                               for e in range(n_exp)])
        elif key.endswith("mlp.experts.down_proj"):
            p = key[: -len("down_proj")]
            exp = torch.stack([ref[f"{p}{e}.down_proj.weight"] for e in range(n_exp)])
        elif key == "lm_head.weight" and key not in ref:
            exp = ref["model.embed_tokens.weight"]
        else:
            exp = ref[key]
        torch.testing.assert_close(t.double(), exp, rtol=2 ** -23, atol=0, msg=key)


def test_hf_transformers_reads_it(src, fp8_dir):
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it (CPU: dequantises to bf16)
    from transformers import AutoModelForCausalLM

    from megatron_rl.rollout.engine.model_runner import ModelRunner

    hf = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16).eval()
    # (transformers drops its quantizer after dequantising on CPU; the weights below would be raw
    # e4m3 codes, off by the scale, had it not read quantization_config + weight_scale_inv)
    ids = torch.randint(0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    ours = ModelRunner(str(fp8_dir), dtype="bfloat16").model
    theirs = hf.state_dict()
    for k, t in ours.state_dict().items():  # HF's dequantised bf16 weights == ours
        torch.testing.assert_close(theirs[k].float(), t.float(), rtol=2 ** -7, atol=0, msg=k)
    with torch.no_grad():
        a, b = hf(ids).logits.float(), ours(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max(), (a - b).abs().max()


def test_missing_scale_refused_naming_tensor(fp8_dir, tmp_path):
    from megatron_rl.quant.fp8_engine import from_pretrained

    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    victim = "model.layers.2.self_attn.o_proj.weight_scale_inv"
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    f = bad / index["weight_map"].pop(victim)
    sd = load_file(f)
    del sd[victim]
    save_file(sd, f)
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight"):
        from_pretrained(str(bad), torch.float32)
