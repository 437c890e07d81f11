"""FP8 training flags (Megatron's names) and TE-spec weight names for export, on CPU.

Flags: FP8 / TE asked for where TE cannot run is refused naming the flag; with TE (pretended)
every override is a real ``TransformerConfig`` field (a misspelt field name fails here).

TE names (method, and why): Transformer Engine cannot be installed on these machines, so the TE
module tree cannot be built. We take the TE-spec names from Megatron itself where it states them:
the local spec's ``sharded_state_dict_keys_map`` gives every fused layer-norm its TE name (the
``ShardedTensor.key`` of the local model's norms), and TE GroupedLinear's ``weight{e}`` convention
(``TEGroupedMLP``) names the grouped experts. A "TE-named twin" of the local model (same tensors,
TE names) must export through ``iter_hf_tensors`` to exactly the local model's HF tensors: any name
our map gets wrong leaves a parameter without a rule (CheckpointError) or a tensor in the wrong
place (bytes differ). A misspelt TE name is shown to fail.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_rl.quant.fp8_training import FP8_RECIPES, add_fp8_args, fp8_pad_multiple, resolve_fp8
from megatron_rl.testing import run_distributed


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_fp8_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv,flag", [
    (("--fp8-format", "e4m3"), "--fp8-format e4m3"),
    (("--fp8-format", "hybrid", "--fp8-recipe", "blockwise"), "--fp8-format hybrid"),
    (("--transformer-impl", "transformer_engine"), "--transformer-impl transformer_engine"),
    (("--moe-grouped-gemm",), "--moe-grouped-gemm"),
])
def test_fp8_without_te_is_refused(argv, flag):
    with pytest.raises(ValueError, match=flag):
        resolve_fp8(_args(*argv), device="cpu", te_available=False, is_moe=True)
    with pytest.raises(ValueError, match=flag.split()[0]):  # TE importable but no CUDA
        resolve_fp8(_args(*argv), device="cpu", te_available=True, is_moe=True)


def test_fp8_with_local_spec_is_refused():
    with pytest.raises(ValueError, match="--fp8-format e4m3 needs --transformer-impl transformer_engine"):
        resolve_fp8(_args("--fp8-format", "e4m3", "--transformer-impl", "local"), device="cuda",
                    te_available=True)


def test_default_is_unchanged_behaviour():
    assert resolve_fp8(_args(), device="cpu", te_available=False) .use_te is False
    assert resolve_fp8(_args(), device="cuda", te_available=True).use_te is True
    assert resolve_fp8(_args("--transformer-impl", "local"), device="cuda", te_available=True).use_te is False
    assert resolve_fp8(_args(), device="cuda", te_available=True).overrides == {}


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_overrides_are_transformer_config_fields(recipe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    plan = resolve_fp8(_args("--fp8-format", "hybrid", "--fp8-recipe", recipe, "--moe-grouped-gemm",
                             "--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "2"),
                       device="cuda", te_available=True, is_moe=True)
    assert plan.use_te
    fields = TransformerConfig.__dataclass_fields__
    assert set(plan.overrides) <= set(fields), set(plan.overrides) - set(fields)
    assert plan.overrides["fp8"] == "hybrid" and plan.overrides["fp8_recipe"] == recipe
    assert plan.overrides["moe_router_padding_for_quantization"] is True
    assert plan.overrides["num_layers_at_end_in_bf16"] == 2
    assert plan.pad_multiple == {"blockwise": 128, "mxfp8": 32}.get(recipe, 16)
    assert fp8_pad_multiple(None) == 1


def test_setup_refuses_fp8_before_building(tiny_hf_dir, tmp_path):
    from megatron_rl.train.setup import setup
    from megatron_rl.train.sft import parse_args

    args = parse_args(["--hf", tiny_hf_dir, "--train-data", "x.jsonl", "--out", str(tmp_path),
                       "--fp8-format", "e4m3", "--device", "cpu"])
    with pytest.raises(ValueError, match="--fp8-format e4m3.*silently train in bf16"):
        setup(args, train_steps=args.train_iters, seq_length=args.seq_length)


# ----------------------------------------------------------------------------- TE names


class _TENamed(torch.nn.Module):
    """The local model's tensors under TE-spec names (no copy)."""

    def __init__(self, inner, names: dict[str, str]):
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        self._names = names

    def __getattr__(self, item):
        if item in ("_inner", "_names") or item.startswith("_"):
            return super().__getattr__(item)
        return getattr(object.__getattribute__(self, "_inner"), item)

    def named_parameters(self, *a, **k):
        for n, p in self._inner.named_parameters():
            yield self._names.get(n, n), p

    def parameters(self, *a, **k):
        return self._inner.parameters()

    def named_buffers(self, *a, **k):
        return self._inner.named_buffers()


def _te_names(model) -> dict[str, str]:
    """local name -> TE name: norms from Megatron's sharded keys, experts from TE's weight{e}."""
    import re

    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, sh in model.sharded_state_dict().items():
        local = ids.get(id(getattr(sh, "data", None)))
        if local is not None and "layer_norm_" in sh.key:
            out[local] = sh.key  # e.g. decoder.layers.0.self_attention.linear_qkv.layer_norm_weight
    for n in ids.values():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight", n)
        if m:
            out[n] = f"{m.group(1)}.{m.group(3)}.weight{m.group(2)}"
    return out


def _te_worker(rank: int, world: int, hf_dir: str) -> dict:
    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.checkpoint.te_names import te_to_local_name
    from megatron_rl.models import ModelOptions, build_model, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), device="cpu", seed=1)
    hf = load_hf_config(hf_dir)
    model = build_model(hf, transformer_config_from_hf(hf, ModelOptions(), tp=1, pp=1, ep=1, etp=1))
    load_hf_weights(model, hf_dir, hf)
    names = _te_names(model)
    res = {"n_norm": sum("layer_norm_" in v for v in names.values()),
           "n_grouped": sum(".weight" in v and not v.endswith(".weight") for v in names.values()),
           "roundtrip": {te: te_to_local_name(te) == local for local, te in names.items()},
           "extra_state": te_to_local_name("decoder.layers.0.self_attention.linear_qkv._extra_state")}
    ref = {k: t.clone() for b in iter_hf_tensors(model, hf) for k, t in b.items()}
    got = {k: t.clone() for b in iter_hf_tensors(_TENamed(model, names), hf) for k, t in b.items()}
    res["equal"] = set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    res["n_hf"] = len(ref)
    bad = dict(names)
    victim = next(k for k, v in names.items() if v.endswith("linear_qkv.layer_norm_weight"))
    bad[victim] = names[victim].replace("layer_norm_weight", "layernorm_weight")
    try:
        list(iter_hf_tensors(_TENamed(model, bad), hf))
        res["misspelt"] = "no error"
    except Exception as e:  # noqa: BLE001
        res["misspelt"] = f"{type(e).__name__}: {e}"
    destroy_parallel()
    return res


def test_te_spec_names_export_like_local(tiny_hf_dir):
    (res,) = run_distributed(_te_worker, 1, tiny_hf_dir)
    assert res["n_norm"] == 2 * 4  # input + pre-MLP norm per layer, from Megatron's keys map
    assert res["n_grouped"] == 2 * 8 * 4  # fc1/fc2 x 8 experts x 4 layers
    assert all(res["roundtrip"].values()), [k for k, v in res["roundtrip"].items() if not v]
    assert res["extra_state"] is None
    assert res["equal"] and res["n_hf"] > 0
    assert "CheckpointError" in res["misspelt"] and "layernorm_weight" in res["misspelt"], res["misspelt"]


def test_plain_dequantises_te_style_fp8_params():
    from megatron_rl.checkpoint.te_names import plain, te_to_local_name

    class FakeFloat8Tensor(torch.Tensor):  # TE QuantizedTensor stand-in: a subclass with dequantize()
        def dequantize(self):
            return torch.full(self.shape, 7.0)

    p = torch.nn.Parameter(torch.ones(2, 3))
    d = p.data
    assert plain(p) is p and plain(d) is d  # plain tensors are not touched
    q = torch.ones(2, 3).as_subclass(FakeFloat8Tensor)
    assert type(plain(q)) is torch.Tensor and (plain(q) == 7).all()
    assert te_to_local_name("decoder.layers.3.mlp.experts.linear_fc2.bias5") == \
        "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.bias"
    assert te_to_local_name("decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight") == \
        "decoder.layers.0.self_attention.q_layernorm.weight"


@pytest.mark.parametrize("pack", [False, True])
def test_rl_rows_padded_to_the_fp8_token_multiple(monkeypatch, pack):
    """With an FP8 recipe's multiple (128, blockwise) every micro-batch row length is a multiple of
    it, and the rows hold the same tokens, loss mask and advantages as without padding (the extra
    columns are pad tokens with loss_mask 0). Reference: the token_multiple=1 batch of the same
    samples."""
    import random

    from megatron.core import parallel_state as ps

    from megatron_rl.train.grpo import shard_minibatches
    from megatron_rl.train.rl_batch import Sample
    from megatron_rl.train.rl_config import RLConfig

    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda: 1)
    monkeypatch.setattr(ps, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(ps, "get_data_parallel_group", lambda: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)  # one DP rank
    rng = random.Random(0)
    samples = [Sample(prompt_ids=[rng.randrange(1, 50) for _ in range(rng.randint(2, 9))],
                      output_ids=[rng.randrange(1, 50) for _ in range(rng.randint(1, 30))],
                      rollout_logprobs=None, reward=1.0, finish_reason="stop", weight_version="0", group=i // 2)
               for i in range(8)]
    for s in samples:
        s.rollout_logprobs = [-0.5] * len(s.output_ids)
    adv = torch.linspace(-1, 1, 8)
    cfg = RLConfig(rollout_batch_size=4, n_samples_per_prompt=2, micro_batch_size=4, pack_rollouts=pack)
    plain = shard_minibatches(samples, adv, cfg, pad_id=0, token_multiple=1)
    fp8 = shard_minibatches(samples, adv, cfg, pad_id=0, token_multiple=fp8_pad_multiple("blockwise"))
    assert all(mb.tokens.shape[1] % 128 == 0 for mb in fp8[0])
    for key in ("loss_mask", "advantages"):  # the same loss tokens and weights, however laid out
        total = [sum(getattr(mb, key).double().sum() for mb in mbs) for mbs in (fp8[0], plain[0])]
        torch.testing.assert_close(total[0], total[1], rtol=0, atol=1e-9, msg=key)
    if pack:  # a wider row may hold more samples; each sample sits whole where sample_index says
        seen = []
        for mb in fp8[0]:
            for i, row, off, n in mb.sample_index:
                s = samples[i]
                assert mb.tokens[row, off: off + n].tolist() == s.prompt_ids + s.output_ids
                seen.append(i)
        assert sorted(seen) == list(range(len(samples)))
        return
    assert len(plain[0]) == len(fp8[0])
    for a, b in zip(plain[0], fp8[0]):
        s_a = a.tokens.shape[1]
        for key in ("tokens", "loss_mask", "advantages"):
            assert torch.equal(getattr(b, key)[:, :s_a], getattr(a, key)), key
        assert not b.loss_mask[:, s_a:].any() and (b.tokens[:, s_a:] == 0).all()
