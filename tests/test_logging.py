"""Run logging: metrics.jsonl + W&B (offline, read back from wandb's own run file), the per-step
console line, and when progress bars show.

The W&B run is read back with wandb's own protobuf ``Record`` (tests/_wandb_offline.py), not
through our logger; no network (WANDB_MODE=offline).
"""

import json
import math

import pytest

from megatron_rl.train.logging import MetricsLogger, WandbOptions, format_step_line, progress_bar


def test_step_line_from_a_hand_built_metrics_dict():
    metrics = {"rollout/reward_mean": 0.5123, "rollout/pass@1": 0.375, "rollout/response_len_mean": 14.25,
               "rollout/truncation_rate": 0.25, "mismatch/logprob_abs_diff": 1.234e-6, "train/kl": 0.00312,
               "perf/step_time_s": 31.24, "train/loss": 0.1}
    assert format_step_line(3, 10, metrics, eta_s=3 * 3600 + 62.4) == (
        "step 3/10 | reward 0.512 | pass@1 0.375 | len 14.2 | trunc 0.25 | mismatch 1.23e-06 | kl 3.12e-03 "
        "| 31.2 s/step | eta 3:01:02")
    # fields a run does not compute (KL off, no eval) are left out; so is a non-finite ETA
    assert format_step_line(1, 2, {"rollout/reward_mean": 1.0}, eta_s=math.inf) == "step 1/2 | reward 1.000"


def test_progress_bars_only_on_a_terminal_or_when_asked(monkeypatch):
    monkeypatch.delenv("MEGATRON_RL_PROGRESS", raising=False)
    assert progress_bar(4, "rollout") is None  # pytest's stderr is not a terminal
    monkeypatch.setenv("MEGATRON_RL_PROGRESS", "1")
    bar = progress_bar(4, "rollout")
    assert bar is not None and bar.total == 4
    bar.close()
    monkeypatch.setenv("MEGATRON_RL_PROGRESS", "0")
    assert progress_bar(4, "rollout") is None


def test_wandb_offline_run_holds_the_metrics_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from _wandb_offline import history_and_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    opts = WandbOptions(project="megatron-rl-test", name="tiny", save_dir=str(tmp_path / "wb"))
    config = {"lr": 1e-3, "eval_data": ["id=x.jsonl"], "rl": {"kl_coef": 0.0, "advantage": "grpo"},
              "engine_extra_args": ("--dtype", "float32")}
    log = MetricsLogger(str(out), wandb=opts, config=config)
    log.log(1, {"train/loss": 0.5, "reward/even": 0.25, "perf/nan": float("nan")})
    log.log(2, {"train/loss": 0.25, "train/ok": True})
    log.close()
    # resume after step 1: same W&B run id, step 2 logged again (x axis = our step)
    log = MetricsLogger(str(out), resume_step=1, wandb=opts, config=config)
    log.log(2, {"train/loss": 0.125})
    log.close()
    jsonl = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert jsonl == [{"step": 1, "train/loss": 0.5, "reward/even": 0.25, "perf/nan": None},
                     {"step": 2, "train/loss": 0.125}]
    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list((tmp_path / "wb").rglob("*.wandb"))
    hist, cfg, run = history_and_config(files[0])
    assert run.project == "megatron-rl-test" and run.display_name == "tiny" and run.run_id == run_id
    assert [{k: v for k, v in h.items() if not k.startswith("_")} for h in hist] == [
        {"step": 1, "train/loss": 0.5, "reward/even": 0.25}, {"step": 2, "train/loss": 0.25, "train/ok": 1}]
    assert cfg["lr"] == 1e-3 and cfg["rl"] == {"kl_coef": 0.0, "advantage": "grpo"}
    assert cfg["eval_data"] == ["id=x.jsonl"] and cfg["engine_extra_args"] == ["--dtype", "float32"]
    hist2, _, _ = history_and_config(files[1])
    assert [h["train/loss"] for h in hist2] == [0.125] and hist2[0]["step"] == 2


def test_wandb_asked_for_but_not_installed_names_the_extra(tmp_path, monkeypatch):
    from megatron_rl import _optional

    monkeypatch.setattr(_optional, "has_wandb", lambda: False)
    with pytest.raises(ImportError, match=r"--wandb-project 'p' needs the wandb package .*megatron_rl\[wandb\]"):
        MetricsLogger(str(tmp_path), wandb=WandbOptions(project="p"))
    assert WandbOptions.from_args(type("A", (), {"wandb_project": None})()) is None
