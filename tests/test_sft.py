"""SFT trainer end to end on the tiny model: metrics schema, exact resume after a kill, the
HF export of the trained weights, and data errors surfacing with file:line."""

import json
import os

import pytest
import torch

from megatron_rl.testing import run_distributed

from _sft_runs import run_sft


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate

    d = tmp_path_factory.mktemp("sftdata")
    write_jsonl_atomic(d / "train.jsonl", generate("id", 300, seed=11))
    write_jsonl_atomic(d / "eval.jsonl", generate("id", 8, seed=12))
    return d


def _argv(hf, data, out, *extra):
    return ["--hf", hf, "--train-data", str(data / "train.jsonl"), "--out", str(out),
            "--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--train-steps", "6", "--lr", "2e-3", "--lr-warmup-steps", "2",
            "--save-interval", "3", "--seed", "3", *extra]


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _losses(path):
    return {r["step"]: r["train/loss"] for r in _records(path) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tiny_hf_dir, data_dir, tmp_path_factory):
    """DP=2 with the DistributedOptimizer: 6 steps straight (with eval and HF export), and the
    same command stopped after step 4 (checkpoint at 3) then resubmitted."""
    tmp = tmp_path_factory.mktemp("sftruns")
    full, cut, hf = tmp / "full", tmp / "cut", tmp / "hf"
    run_distributed(run_sft, 2, _argv(tiny_hf_dir, data_dir, full,
                                      "--eval-data", f"id={data_dir / 'eval.jsonl'}",
                                      "--eval-samples", "8", "--save-hf", str(hf)))
    run_distributed(run_sft, 2, _argv(tiny_hf_dir, data_dir, cut, "--stop-after-steps", "4"))
    cut_losses = _losses(cut / "metrics.jsonl")
    run_distributed(run_sft, 2, _argv(tiny_hf_dir, data_dir, cut))
    return {"full": full, "cut": cut, "hf": hf, "cut_losses_before_resume": cut_losses}


def test_resume_after_kill_matches_uninterrupted_run(runs):
    """Steps 4..6 after the resubmission give the same losses as the uninterrupted run."""
    full, cut = runs["full"], runs["cut"]
    assert max(runs["cut_losses_before_resume"]) == 4  # killed after step 4, checkpoint at 3

    a, b = _losses(full / "metrics.jsonl"), _losses(cut / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # step 4 logged once after resume
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    assert a[6] < a[1]  # it learns

    recs = _records(full / "metrics.jsonl")
    for key in ("step", "train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"):
        assert all(key in r for r in recs if "train/loss" in r), key
    evals = [r for r in recs if "eval/id/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6] and evals[0]["eval/id/n"] == 8
    assert os.path.isdir(full / "tensorboard")


def test_exported_hf_model_is_the_trained_model(runs, tiny_hf_dir):
    """The --save-hf output (gathered from DP=2 ranks) loads in transformers, has the same keys
    as the input checkpoint, and its weights moved."""
    from transformers import AutoModelForCausalLM

    hf_out = runs["hf"]
    trained = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    sd0, sd1 = init.state_dict(), trained.state_dict()
    assert set(sd0) == set(sd1)
    moved = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert len(moved) > len(sd0) // 2


def test_overlong_sample_names_file_and_line(tiny_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_rl.data.jsonl import DatasetError
    from megatron_rl.train.sft_data import load_sft_samples

    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "Ann has 3 pens.", "label": "3", "solution": "3"},
            {"prompt": "Ann has 3 pens. " * 40, "label": "3", "solution": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    with pytest.raises(DatasetError, match=rf"{path}:2: .*tokens > max_len 64"):
        load_sft_samples(str(path), tok, 64)


def test_missing_label_names_file_and_line(tiny_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_rl.data.jsonl import DatasetError
    from megatron_rl.train.sft_data import load_sft_samples

    path = tmp_path / "nolabel.jsonl"
    path.write_text(json.dumps({"prompt": "a", "label": "1", "solution": "1"}) + "\n"
                    + json.dumps({"prompt": "b", "solution": "2"}) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    with pytest.raises(DatasetError, match=rf"{path}:2: .*label"):
        load_sft_samples(str(path), tok, 64)
    assert len(load_sft_samples(str(path), tok, 64, require_label=False)) == 2
