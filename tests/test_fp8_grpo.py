"""GRPO end to end with FP8 rollouts (``--rollout-fp8 block128``: engine started from an FP8 copy
of --hf, every sync quantised) and FP8 QAT (``--fp8-qat``), tiny model, fp32, one engine.

References: the engine's own weight_version after each step; the bf16/fp32 "perfect baseline" of
tests/test_grpo.py (mismatch < 1e-5) is what FP8 rollouts must visibly break, and QAT -- computing
with the engine's FP8 weights, re-scaled after every optimizer step -- must restore it."""

import json

import pytest

from megatron_rl.testing import run_distributed

from _grpo_runs import run_grpo
from test_grpo import _argv, data_dir  # noqa: F401 - fixture


def _run(tiny_hf_dir, data_dir, out, *extra) -> tuple[dict, dict]:
    argv = _argv(tiny_hf_dir, data_dir, out, "--rollout-fp8", "block128", *extra)
    argv[argv.index("--num-engines") + 1] = "1"
    (res,) = run_distributed(run_grpo, 1, argv)
    return res, {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}


def test_grpo_fp8_rollout_and_qat(tiny_hf_dir, data_dir, tmp_path):  # noqa: F811
    pytest.importorskip("modelopt.torch.quantization")
    res, recs = _run(tiny_hf_dir, data_dir, tmp_path / "fp8")
    res_q, recs_q = _run(tiny_hf_dir, data_dir, tmp_path / "qat", "--fp8-qat")
    for r, rec in ((res, recs), (res_q, recs_q)):
        assert r["step"] == 2 and set(r["engine_versions"].values()) == {"2"}
    cfg = json.loads((tmp_path / "fp8" / "rollout_fp8_hf" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    plain = [recs[s]["mismatch/logprob_abs_diff"] for s in (1, 2)]
    qat = [recs_q[s]["mismatch/logprob_abs_diff"] for s in (1, 2)]
    print(f"\nmismatch/logprob_abs_diff: FP8 rollout {plain}, + QAT {qat}")
    assert min(plain) > 1e-4  # FP8 rollouts are not the fp32 policy
    assert max(qat) < 1e-4  # QAT computes with the engine's FP8 weights (fp32 both sides)
    assert (tmp_path / "qat" / "checkpoints" / "iter_0000002").is_dir()
