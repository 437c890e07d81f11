"""FP8 rollouts end to end on CPU: an embedded engine started from an FP8 copy of the tiny model
(``write_fp8_hf_dir``), ``WeightSync(fp8_block=(128, 128))`` in "tensor", "disk" and "distributed"
(gloo) modes, versions
checked, and the engine's logprobs equal to those of an HF transformers model whose weights are the
exported Megatron weights quantised / dequantised by a float64 reference written here.
Also: the engine's optional activation fake-quant against a float64 per-token-group reference."""

from __future__ import annotations

import asyncio

import pytest
import torch

from megatron_rl.rollout.client import SamplingParams, SGLangClient
from megatron_rl.testing import run_distributed

from _fp8_ref import ref_qdq

PROMPTS = [[5, 6, 7, 8], [11, 3, 42, 9, 17, 2]]


@pytest.fixture(scope="module")
def fp8_engine(tiny_hf_dir, tmp_path_factory):
    from megatron_rl.quant.fp8_engine import write_fp8_hf_dir
    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig

    d = write_fp8_hf_dir(tiny_hf_dir, str(tmp_path_factory.mktemp("fp8eng") / "fp8"))
    cfg = LaunchConfig(model_path=d, num_engines=1, router=False, health_timeout_s=120)
    with EngineLauncher(cfg) as launcher:
        yield launcher


def _worker(rank: int, world: int, hf_dir: str, url: str) -> dict:
    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.rollout.weight_sync import WeightSync
    from megatron_rl.train.engine import OptimConfig, build_trainer

    pc = ParallelConfig()
    init_parallel(pc, device="cpu", seed=7)
    hf = load_hf_config(hf_dir)
    cfg = transformer_config_from_hf(hf, ModelOptions(), tp=1, pp=1, ep=1, etp=1)
    tr = build_trainer(hf, cfg, OptimConfig(lr=1e-3, warmup_steps=0, train_steps=1, decay_style="constant"))
    load_hf_weights(tr.model, hf_dir, hf)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a "trained" policy: every weight moved
        for p in tr.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    res = {"plain": WeightSync(SGLangClient([url]), bucket_bytes=64 * 1024).sync(tr.model, hf, version=1)}
    res["tensor"] = WeightSync(SGLangClient([url]), bucket_bytes=64 * 1024,
                               fp8_block=(128, 128)).sync(tr.model, hf, version=2)
    res["versions_tensor"] = WeightSync(SGLangClient([url])).check_versions(2)
    res["disk"] = WeightSync(SGLangClient([url]), mode="disk", fp8_block=(128, 128)).sync(tr.model, hf, version=3)
    res["versions_disk"] = WeightSync(SGLangClient([url])).check_versions(3)
    dist = WeightSync(SGLangClient([url]), mode="distributed", fp8_block=(128, 128), bucket_bytes=64 * 1024)
    res["dist"] = dist.sync(tr.model, hf, version=4)  # gloo: FP8 weights travel as uint8 bytes
    res["versions_dist"] = WeightSync(SGLangClient([url])).check_versions(4)
    dist.destroy_group()
    res["export"] = {k: t.clone() for b in iter_hf_tensors(tr.model, hf) for k, t in b.items()}
    destroy_parallel()
    return res


async def _generate(url: str):
    async with SGLangClient([url]) as c:
        sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
        return [await c.generate(p, sp, rid=f"fp8-{i}") for i, p in enumerate(PROMPTS)]


def _hf_logprobs(hf_dir: str, named: dict, samples) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from megatron_rl.rollout.engine.weights import load_named_tensors

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load_named_tensors(model, {k: v.float() for k, v in named.items()})
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.output_ids])
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            tgt = ids[0, len(s.prompt_ids):]
            out.append(lp[len(s.prompt_ids) - 1:-1].gather(1, tgt[:, None])[:, 0])
    return out


def test_fp8_sync_versions_and_engine_numerics(fp8_engine, tiny_hf_dir):
    from megatron_rl.quant.fp8 import is_quantized_name

    url = fp8_engine.engine_urls[0]
    (res,) = run_distributed(_worker, 1, tiny_hf_dir, url)
    assert res["versions_tensor"] == {url: "2"} and res["versions_disk"] == {url: "3"}
    assert res["versions_dist"] == {url: "4"}
    # fp32 Linear weights -> 1 byte + a scale per block: the payload shrinks
    assert res["tensor"]["sync/bytes"] < 0.5 * res["plain"]["sync/bytes"]
    export = res["export"]
    quantised = {k for k in export if is_quantized_name(k)}
    assert len(quantised) == 4 * (4 + 3 * 8)  # q/k/v/o + 8 experts x gate/up/down per layer
    ref = {k: (ref_qdq(t) if k in quantised else t.double()) for k, t in export.items()}
    samples = asyncio.run(_generate(url))
    assert {s.weight_version for s in samples} == {"4"}
    want = _hf_logprobs(tiny_hf_dir, ref, samples)
    unquantised = _hf_logprobs(tiny_hf_dir, export, samples)
    for s, w, u in zip(samples, want, unquantised):
        got = torch.tensor(s.logprobs, dtype=torch.float64)
        assert (got - w).abs().max() < 1e-4, (got - w).abs().max()
        assert (got - u).abs().max() > 1e-3  # the FP8 numerics are really what the engine runs


def test_activation_fake_quant_hook(tiny_hf_dir, tmp_path):
    from megatron_rl.quant.fp8_engine import from_pretrained, write_fp8_hf_dir

    d = write_fp8_hf_dir(tiny_hf_dir, str(tmp_path / "fp8"))
    plain = from_pretrained(d, torch.float32, fake_quant_activations=False)
    fq = from_pretrained(d, torch.float32, fake_quant_activations=True)
    assert fq.fp8_activation_hooks == 4 * 5  # q/k/v/o + the experts block, per layer
    q = fq.model.layers[1].self_attn.q_proj
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(0)) * 3
    x64 = x.double()
    xq = torch.empty_like(x64)
    for t in range(3):
        for j in range(0, x.shape[1], 128):
            s = x64[t, j:j + 128].abs().max().item() / 448.0
            xq[t, j:j + 128] = (x64[t, j:j + 128] / s).to(torch.float8_e4m3fn).double() * s
    with torch.no_grad():
        got = q(x).double()
        torch.testing.assert_close(got, xq @ q.weight.double().T, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        a, b = fq(ids).logits, plain(ids).logits
    assert 0 < (a - b).abs().max() < 0.1 * b.abs().max()
