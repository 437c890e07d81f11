"""Datasets and verifiers: one loader for jsonl / parquet / HF dirs / JSON arrays with key mapping
(``data.loader``), ``--verifier`` resolution and the verifier-metrics protocol
(``rollout.rewards``), and a GRPO run from parquet whose verifier is named by the flag.

References: the existing jsonl reader (``data.jsonl.load_jsonl``) for what a row must load as,
hand-written schema rows for the mapping, and ``rollout/reward_mean`` (computed from the samples'
rewards by ``rollout_stats``) for a verifier metric equal to the reward.
"""

import json
import textwrap

import pytest

from megatron_rl.data.jsonl import DatasetError, load_jsonl, write_jsonl_atomic
from megatron_rl.data.loader import RowKeys, load_rows
from megatron_rl.rollout.rewards import RewardRunner, resolve_verifier

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [
    {"prompt": "Ann has 3 pens. How many?", "label": "3", "solution": "3", "op": 1},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}], "label": "2"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": "4"},
]


def _columns(rows):
    """Rows -> {column: values}; every key of any row is a column (null where a row lacks it)."""
    return {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}


def _parquet(path, rows):
    pq.write_table(pa.table(_columns(rows)), path)
    return path


def _rows(path, **kw):
    return [r for _, r in load_rows(path, **kw)]


def test_jsonl_parquet_hf_dir_and_json_array_load_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_jsonl_atomic(tmp_path / "d.jsonl", ROWS)
    _parquet(tmp_path / "d.parquet", ROWS)
    datasets.Dataset.from_dict(_columns(ROWS)).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    reference = load_jsonl(tmp_path / "d.jsonl")  # the pre-existing reader
    assert reference == ROWS
    for name in ("d.jsonl", "d.parquet", "hf", "d.json"):
        assert _rows(tmp_path / name) == reference, name
    # locations: 1-based jsonl lines (blank lines counted), 0-based rows elsewhere
    (tmp_path / "gaps.jsonl").write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [w for w, _ in load_rows(tmp_path / "gaps.jsonl")] == [f"{tmp_path}/gaps.jsonl:2",
                                                                   f"{tmp_path}/gaps.jsonl:4"]
    assert [w for w, _ in load_rows(tmp_path / "d.parquet")][1] == f"{tmp_path}/d.parquet: row 1"


def test_key_mapping_plain_strings_chat_lists_and_dotted_keys(tmp_path):
    verl = [  # verl's layout: chat-list prompt, nested ground truth
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
         "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": 0}},
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "5-2?"}],
         "reward_model": {"style": "rule", "ground_truth": "3"}, "extra_info": {"index": 1}},
    ]
    keys = RowKeys(input="prompt", label="reward_model.ground_truth")
    got = _rows(_parquet(tmp_path / "verl.parquet", verl), keys=keys)
    assert [r["messages"] for r in got] == [[{"role": "user", "content": "1+1?"}],
                                            [{"role": "user", "content": "5-2?"}]]
    assert [r["label"] for r in got] == ["2", "3"] and "prompt" not in got[0]
    assert got[0]["extra_info"] == {"index": 0}  # other columns are kept
    # the default --input-key (messages) takes verl's chat-list `prompt` column as the conversation
    assert _rows(tmp_path / "verl.parquet", keys=RowKeys(label="reward_model.ground_truth")) == got
    # plain-string question + answer + SFT target under other names; a literal dotted column wins
    qa = [{"question": "Ann has 3 pens.", "answer": "3", "worked": "She has 3.", "a.b": "lit", "a": {"b": "nested"}}]
    write_jsonl_atomic(tmp_path / "qa.jsonl", qa)
    (row,) = _rows(tmp_path / "qa.jsonl", keys=RowKeys(input="question", label="answer", solution="worked"),
                   require_solution=True)
    assert {k: row[k] for k in ("prompt", "label", "solution")} == {
        "prompt": "Ann has 3 pens.", "label": "3", "solution": "She has 3."}
    assert not {"question", "answer", "worked"} & row.keys()
    (row,) = _rows(tmp_path / "qa.jsonl", keys=RowKeys(input="question", label="a.b"))
    assert row["label"] == "lit"


def test_parquet_nulls_are_absent_and_sft_samples_match_jsonl(tmp_path, tiny_hf_dir):
    from transformers import AutoTokenizer

    from megatron_rl.train.sft_data import load_sft_samples

    rows = [{"prompt": "Ann has 3 pens.", "label": "3", "solution": "3"},
            {"prompt": "Bob has 2.", "label": "2", "solution": None}]  # null in a columnar file = absent
    got = _rows(_parquet(tmp_path / "n.parquet", rows))
    assert got == [rows[0], {"prompt": "Bob has 2.", "label": "2"}]
    sft_rows = [ROWS[0], ROWS[2]]  # rows with an assistant target
    write_jsonl_atomic(tmp_path / "s.jsonl", sft_rows)
    _parquet(tmp_path / "s.parquet", sft_rows)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    samples = load_sft_samples(str(tmp_path / "s.parquet"), tok, 256)
    assert len(samples) == 2 and samples == load_sft_samples(str(tmp_path / "s.jsonl"), tok, 256)
    _parquet(tmp_path / "nt.parquet", ROWS[:2])  # row 1 has no assistant turn
    with pytest.raises(DatasetError, match=r"nt\.parquet: row 1: no assistant turn"):
        load_sft_samples(str(tmp_path / "nt.parquet"), tok, 256)


@pytest.mark.parametrize("rows, keys, where, needles", [
    ([{"question": "q", "label": "1"}, {"q": "x", "label": "1"}], RowKeys(input="question"), "row 1",
     ["no 'question' (--input-key)", "['label', 'q']"]),
    ([{"prompt": "q", "answer": "1"}], RowKeys(label="answer.value"), "row 0",
     ["no 'answer.value' (--label-key)", "['answer', 'prompt']"]),
    ([{"prompt": "q", "label": 7}], RowKeys(), "row 0", ["'label' must be str, got int"]),
    ([{"messages": [{"role": "bot", "content": "x"}], "label": "1"}], RowKeys(), "row 0", ["role 'bot'"]),
])
def test_errors_name_file_row_and_key(tmp_path, rows, keys, where, needles):
    for path in (_parquet(tmp_path / "bad.parquet", rows), tmp_path / "bad.jsonl"):
        write_jsonl_atomic(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DatasetError) as e:
            load_rows(path, keys=keys)
        loc = f"{path}: {where}:" if path.suffix == ".parquet" else f"{path}:{int(where.split()[1]) + 1}:"
        assert str(e.value).startswith(loc) and all(n in str(e.value) for n in needles), str(e.value)


def test_format_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"DatasetDict with splits \['train'\]; pass one split"):
        load_rows(tmp_path / "dd")
    (tmp_path / "obj.json").write_text('[{"prompt": "a", "label": "1"}, 3]')
    with pytest.raises(DatasetError, match=r"obj\.json: row 1: row must be a JSON object"):
        load_rows(tmp_path / "obj.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        load_rows(tmp_path / "broken.parquet")
    _parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DatasetError, match="empty dataset"):
        load_rows(tmp_path / "empty.parquet")
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        load_rows(tmp_path / "missing.parquet")


# ---------------------------------------------------------------- verifiers
def test_resolve_verifier_builtin_module_and_file(tmp_path, monkeypatch):
    from megatron_rl.rollout.rewards import math_verifier, synthetic_verifier

    assert resolve_verifier("synthetic") is synthetic_verifier and resolve_verifier("math") is math_verifier
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def exact(response, label):
            return float(response.strip() == label)

        class Scorer:
            @staticmethod
            def score(response, label):
                return {"reward": 1.0, "length": len(response)}

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_verifier("my_rewards:exact")(" 7 ", "7") == 1.0
    assert resolve_verifier("my_rewards:Scorer.score")("abc", "x") == {"reward": 1.0, "length": 3}
    assert resolve_verifier(f"{tmp_path / 'my_rewards.py'}:exact")("8", "7") == 0.0
    for spec, needle in [("my_rewards:missing", "has no attribute 'missing'"),
                         ("my_rewards:NOT_CALLABLE", "is a int, not callable"),
                         ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                         (f"{tmp_path / 'nope.py'}:f", "no such file"),
                         ("gsm8k", "expected 'synthetic', 'math' or 'module:callable'")]:
        with pytest.raises(ValueError, match="--verifier") as e:
            resolve_verifier(spec)
        assert needle in str(e.value), str(e.value)


def test_verifier_metrics_are_averaged_over_the_samples_that_report_them():
    def verifier(response, label):
        if response == "crash":
            raise RuntimeError("boom")
        if response == "plain":
            return 0.5
        return {"reward": float(response == label), "length": len(response), "format_ok": response.isdigit()}

    responses = ["1", "22", "x", "plain", "crash", "1", "333", "1"]
    res = RewardRunner(verifier, max_failure_rate=0.2).score_sync(responses, ["1"] * 8, group_size=4)
    dict_samples = [r for r in responses if r not in ("plain", "crash")]  # 6 samples report metrics
    assert res.extra == pytest.approx({"reward/length": sum(map(len, dict_samples)) / 6,
                                       "reward/format_ok": sum(r.isdigit() for r in dict_samples) / 6})
    assert res.metrics["reward/length"] == res.extra["reward/length"] and res.failed.tolist()[4]
    assert res.rewards.tolist()[:4] == [1.0, 0.0, 0.0, 0.5]
    bad = RewardRunner(lambda r, lab: {"reward": 1.0, "mean": 2.0}, max_failure_rate=1.0).score_sync(["a"], ["1"], 1)
    assert "reserved" in bad.errors[0]
    nor = RewardRunner(lambda r, lab: {"score": 1.0}, max_failure_rate=1.0).score_sync(["a"], ["1"], 1)
    assert "without 'reward'" in nor.errors[0]


def test_step_means_of_verifier_metrics_over_dynamic_sampling_rounds():
    from megatron_rl.train.rl_rollout import weighted_means

    got = weighted_means([(4, {"reward/a": 1.0}), (12, {"reward/a": 0.0, "reward/b": float("nan")}),
                          (8, {"reward/b": 2.0})])
    assert got == {"reward/a": 4 / 16, "reward/b": 2.0}


# ---------------------------------------------------------------- GRPO from parquet, --verifier flag
def test_grpo_from_parquet_with_a_flag_named_verifier_logs_its_metrics(tiny_hf_dir, tmp_path, monkeypatch, capfd):
    """Train prompts from parquet (question/answer columns), eval prompts from an HF dataset dir;
    the verifier is named by --verifier and reports ``even`` (== its reward) and ``chars``.
    W&B runs offline: its run holds the same step metrics and the resolved config (flags + RLConfig);
    rank 0 prints one console line per step."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("wandb")
    from _wandb_offline import history_and_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    from _data_runs import run_grpo_flags

    def qa(rows):
        return [{"question": r["prompt"], "answer": {"value": r["label"]}} for r in rows]

    _parquet(tmp_path / "train.parquet", qa(generate("id", 8, seed=21)))
    datasets.Dataset.from_list(qa(generate("id", 4, seed=22))).save_to_disk(str(tmp_path / "eval_hf"))
    out = tmp_path / "run"
    argv = ["--hf", tiny_hf_dir, "--train-data", str(tmp_path / "train.parquet"),
            "--eval-data", f"id={tmp_path / 'eval_hf'}", "--input-key", "question", "--label-key", "answer.value",
            "--verifier", "_data_runs:metric_verifier", "--out", str(out), "--num-engines", "1",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--max-new-tokens", "16",
            "--num-steps", "2", "--micro-batch-size", "4", "--lr-warmup-steps", "0",
            "--eval-n-samples", "2", "--eval-max-prompts", "2", "--seed", "5",
            "--wandb-project", "megatron-rl-test", "--wandb-exp-name", "parquet"]
    (res,) = run_distributed(run_grpo_flags, 1, argv)
    recs = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl"))}
    assert res["step"] == 2
    for step in (1, 2):
        r = recs[step]
        assert r["reward/even"] == pytest.approx(r["rollout/reward_mean"], abs=1e-12)
        assert r["reward/chars"] > 0 and r["rollout/response_len_mean"] > 0
    assert "eval/id/pass@1" in recs[0] and "eval/id/pass@1" in recs[2]
    stdout = capfd.readouterr().out
    assert "step 1/2 | reward " in stdout and "step 2/2 | reward " in stdout and "eta 0:00:00" in stdout
    (wb,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    hist, cfg, run = history_and_config(wb)
    by_step = {h["step"]: h for h in hist}
    assert sorted(by_step) == [0, 1, 2] and run.display_name == "parquet"
    for step in (1, 2):
        assert by_step[step]["reward/even"] == recs[step]["reward/even"]
        assert by_step[step]["train/loss"] == recs[step]["train/loss"]
    assert cfg["verifier"] == "_data_runs:metric_verifier" and cfg["label_key"] == "answer.value"
    assert cfg["rl"]["n_samples_per_prompt"] == 4 and cfg["rl"]["num_steps"] == 2


def test_flags_reach_both_entry_points_and_a_bad_verifier_fails_first(tmp_path):
    from megatron_rl.train import grpo, sft

    extra = ["--input-key", "question", "--label-key", "reward_model.ground_truth", "--solution-key", "worked",
             "--verifier", "math", "--wandb-project", "p", "--wandb-exp-name", "n", "--wandb-entity", "e",
             "--wandb-save-dir", str(tmp_path)]
    base = ["--hf", "x", "--train-data", "t.parquet", "--out", str(tmp_path)]
    args, _ = grpo.parse_args(base + ["--rollout-batch-size", "2", "--n-samples-per-prompt", "4"] + extra)
    sargs = sft.parse_args(base + extra)
    for a in (args, sargs):
        assert (a.input_key, a.label_key, a.solution_key, a.verifier) == (
            "question", "reward_model.ground_truth", "worked", "math")
        assert (a.wandb_project, a.wandb_exp_name, a.wandb_entity, a.wandb_save_dir) == ("p", "n", "e", str(tmp_path))
    defaults = sft.parse_args(base)
    assert (defaults.input_key, defaults.label_key, defaults.solution_key, defaults.verifier,
            defaults.wandb_project) == ("messages", "label", "solution", "synthetic", None)
    write_jsonl_atomic(tmp_path / "rl.jsonl", ROWS)
    for main in (grpo.main, sft.main):  # no model dir: the flag must fail before anything is built
        with pytest.raises(ValueError, match="--verifier 'no_such_mod:f': cannot import"):
            main(["--hf", str(tmp_path / "no_model"), "--train-data", str(tmp_path / "rl.jsonl"),
                  "--out", str(tmp_path / "o"), "--verifier", "no_such_mod:f"])


def test_sft_from_parquet_with_mapped_keys_and_a_flag_named_eval_verifier(tiny_hf_dir, tmp_path):
    """World 1, 2 steps: SFT rows from parquet (question / worked / answer columns), eval rows from
    an HF dataset dir; the eval verifier's ``even`` metric (== its reward) must equal the accuracy."""
    datasets = pytest.importorskip("datasets")
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    from _sft_runs import run_sft

    def qa(rows):
        return [{"question": r["prompt"], "worked": r["solution"], "answer": r["label"]} for r in rows]

    _parquet(tmp_path / "train.parquet", qa(generate("id", 16, seed=11)))
    datasets.Dataset.from_dict(_columns(qa(generate("id", 4, seed=12)))).save_to_disk(str(tmp_path / "eval_hf"))
    out = tmp_path / "sft"
    run_distributed(run_sft, 1, ["--hf", tiny_hf_dir, "--train-data", str(tmp_path / "train.parquet"),
                                 "--eval-data", f"id={tmp_path / 'eval_hf'}", "--out", str(out),
                                 "--input-key", "question", "--solution-key", "worked", "--label-key", "answer",
                                 "--verifier", "_data_runs:metric_verifier", "--seq-length", "128",
                                 "--micro-batch-size", "1", "--global-batch-size", "2", "--train-steps", "2",
                                 "--lr-warmup-steps", "0", "--eval-samples", "4", "--eval-max-new-tokens", "8"])
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in recs if "eval/id/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and [r["step"] for r in recs if "train/loss" in r] == [1, 2]
    for r in evals:
        assert r["eval/id/n"] == 4 and r["eval/id/reward/even"] == pytest.approx(r["eval/id/accuracy"], abs=1e-12)
