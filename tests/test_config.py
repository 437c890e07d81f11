"""The run config tree (megatron_rl.config) through its parsers (train.run_config, sft / grpo
parse_args): every field from the CLI and from YAML, precedence, errors naming key and file,
Megatron's long flags vs the short aliases, --print-config round trip, the resume warning, and
the example YAMLs.

Independent references: Megatron-LM's own flag spellings (megatron/training/arguments.py and
megatron/training/config/*.py, copied below), the flags the hand-written parsers accepted before
the tree (copied below from the code at dc35809), the demo's GRPO flags as grpo_moe.sh passed them
before it used examples/grpo_demo.yaml, and values written by hand into YAML files.
"""

import dataclasses
import os
import typing

import pytest
import yaml

from megatron_rl.config import ALL_SECTIONS, GRPO_TREE, RL_HELP, SFT_TREE, RLConfig, section_name
from megatron_rl.train import grpo_args, sft
from megatron_rl.train.run_config import (ConfigChangedWarning, config_to_yaml, parse_config,
                                          record_run_config, tree_fields, write_config_yaml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQ = ["--hf", "h", "--train-data", "t.jsonl", "--out"]

# Megatron-LM's spellings of what Megatron owns (arguments.py / config/training_config.py)
MEGATRON_FLAGS = """--tensor-model-parallel-size --pipeline-model-parallel-size --expert-model-parallel-size
--expert-tensor-parallel-size --context-parallel-size --sequence-parallel --micro-batch-size --lr --min-lr
--lr-warmup-iters --lr-decay-style --clip-grad --weight-decay --bf16 --seed --moe-token-dispatcher-type
--moe-aux-loss-coeff --moe-z-loss-coeff --moe-grouped-gemm --transformer-impl --fp8-format --fp8-recipe
--first-last-layers-bf16 --num-layers-at-start-in-bf16 --num-layers-at-end-in-bf16 --recompute-granularity
--recompute-method --recompute-num-layers --save --load --save-interval --eval-interval
--use-distributed-optimizer --wandb-project --wandb-exp-name --wandb-entity --wandb-save-dir""".split()
MEGATRON_SFT_ONLY = ["--global-batch-size", "--train-iters", "--seq-length"]

# what the hand-written parsers accepted before the tree (sft.add_common_args + grpo_args.build_parser)
OLD_GRPO_FLAGS = """--advantage --async-one-step-off --bf16 --clip-grad --cp --device --dynamic-sampling
--dynamic-sampling-max-rounds --engine-args --engine-kind --entropy-coef --env --ep --eps-high --eps-low --etp
--eval-data --eval-interval --eval-max-prompts --eval-n-samples --eval-temperature --eval-without-env
--expert-bias-rate --first-last-layers-bf16 --fp8-format --fp8-qat --fp8-recipe --hf --hpt-gamma --icepop-high
--icepop-low --kl-coef --kl-kind --lbl-alpha --lbl-mode --loss-impl --lr --lr-decay-style --lr-warmup-steps
--max-new-tokens --max-tokens-per-turn --max-turns --micro-batch-size --min-lr --mini-batches-per-rollout
--moe-aux-loss-coeff --moe-grouped-gemm --moe-token-dispatcher-type --moe-z-loss-coeff --n-samples-per-prompt
--no-distributed-optimizer --no-resume --num-engines --num-layers-at-end-in-bf16 --num-layers-at-start-in-bf16
--num-steps --out --overlong-buffer --overlong-filter --overlong-penalty --pack-max-tokens --pack-rollouts
--partial-rollout --partial-rollout-extra-groups --pp --recompute --ref-hf --resume-fallback
--rollout-batch-size --rollout-fp8 --routing-flip-rate --routing-replay --save-interval --seed --seq-mask-high
--seq-mask-low --sequence-parallel --stop-after-steps --temperature --tis-cap --top-p --tp --train-data
--transformer-impl --weight-decay""".split()
OLD_SFT_ONLY = """--eval-max-new-tokens --eval-samples --global-batch-size --no-require-label --save-hf
--seq-length --train-steps""".split()
OLD_GRPO_ONLY = {"--advantage", "--async-one-step-off", "--dynamic-sampling", "--dynamic-sampling-max-rounds",
                 "--engine-args", "--engine-kind", "--entropy-coef", "--env", "--eps-high", "--eps-low",
                 "--eval-max-prompts", "--eval-n-samples", "--eval-temperature", "--eval-without-env",
                 "--expert-bias-rate", "--fp8-qat", "--hpt-gamma", "--icepop-high", "--icepop-low", "--kl-coef",
                 "--kl-kind", "--lbl-alpha", "--lbl-mode", "--loss-impl", "--max-new-tokens",
                 "--max-tokens-per-turn", "--max-turns", "--mini-batches-per-rollout", "--n-samples-per-prompt",
                 "--num-engines", "--num-steps", "--overlong-buffer", "--overlong-filter", "--overlong-penalty",
                 "--pack-max-tokens", "--pack-rollouts", "--partial-rollout", "--partial-rollout-extra-groups",
                 "--ref-hf", "--rollout-batch-size", "--rollout-fp8", "--routing-flip-rate", "--routing-replay",
                 "--seq-mask-high", "--seq-mask-low", "--temperature", "--tis-cap", "--top-p"}


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_megatron_names_and_old_flags_are_accepted():
    g, s = _options(grpo_args.build_parser()), _options(sft.build_parser())
    assert not set(MEGATRON_FLAGS) - g and not set(MEGATRON_FLAGS + MEGATRON_SFT_ONLY) - s
    assert not set(OLD_GRPO_FLAGS) - g, set(OLD_GRPO_FLAGS) - g
    old_sft = (set(OLD_GRPO_FLAGS) - OLD_GRPO_ONLY) | set(OLD_SFT_ONLY)
    assert not old_sft - s, old_sft - s


def _other_value(tp, default, choices=None):
    """A value of type ``tp`` different from ``default``, and how to spell it on the command line."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        return _other_value(next(a for a in args if a is not type(None)), default, choices)
    if origin is typing.Literal or choices:
        v = next(c for c in (args if origin is typing.Literal else choices) if c != default)
        return v, [str(v)]
    if origin is list:
        return ["a=x", "b=y"], None
    if tp is bool:
        return (not default), ["false" if default else "true"]
    if tp is int:
        return (default or 0) + 3, [str((default or 0) + 3)]
    if tp is float:
        return (default or 0.0) + 0.5, [str((default or 0.0) + 0.5)]
    return "some/path", ["some/path"]


def _field_values(tree):
    for d in tree:
        hints = typing.get_type_hints(d)
        for f in dataclasses.fields(d):
            if f.name in ("recompute_granularity",):  # a parsed spelling: none|full
                yield d, f, "full", ["full"]
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            v, cli = _other_value(hints[f.name], default, f.metadata.get("choices"))
            yield d, f, v, cli


@pytest.mark.parametrize("build", [sft.build_parser, grpo_args.build_parser], ids=["sft", "grpo"])
def test_every_field_is_reachable_from_cli_and_yaml(build, tmp_path):
    p = build()
    argv, nested = [], {}
    expect = {}
    for d, f, v, cli in _field_values(p.tree):
        flag = f"--{f.name.replace('_', '-')}"
        argv += [flag, *cli] if cli is not None else [x for item in v for x in (flag, item)]
        nested.setdefault(section_name(d), {})[f.name] = v
        expect[f.name] = v
    assert set(expect) == set(tree_fields(p.tree))
    from_cli = parse_config(build(), argv)
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(nested))
    from_yaml = parse_config(build(), ["--config", str(path)])
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({k: v for sec in nested.values() for k, v in sec.items()}))
    from_flat = parse_config(build(), ["--config", str(flat)])
    for name, v in expect.items():
        assert getattr(from_cli, name) == v, name
        assert getattr(from_yaml, name) == v, name
        assert getattr(from_flat, name) == v, name


def test_rl_section_is_rlconfig_and_every_field_has_help():
    rl_fields = {f.name for f in dataclasses.fields(RLConfig)}
    grpo_fields = set(tree_fields(GRPO_TREE))
    assert rl_fields <= grpo_fields  # RLConfig(**...) is built from the namespace
    assert set(RL_HELP) <= rl_fields
    for d in ALL_SECTIONS:
        for f in dataclasses.fields(d):
            assert f.metadata.get("help"), f"{section_name(d)}.{f.name} has no help"
    assert {section_name(d) for d in GRPO_TREE} >= {"model", "parallel", "optimizer", "data", "rl", "rollout",
                                                    "logging"}


def test_yaml_then_flags_precedence(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("optimizer:\n  lr: 2.0e-4\n  lr_decay_style: constant\nparallel:\n  tensor_model_parallel_size: 2\n"
                   "data:\n  eval_data: [a=1.jsonl, b=2.jsonl]\nrl:\n  num_steps: 3\n  eps_high: 0.28\n"
                   f"model:\n  hf: from_file\ncheckpoint:\n  out: {tmp_path / 'o'}\n")
    args, cfg = grpo_args.parse_args(["--config", str(run), "--train-data", "t.jsonl", "--lr", "5e-4",
                                      "--eval-data", "c=3.jsonl", "--tp", "1"])
    assert args.lr == 5e-4 and args.lr_decay_style == "constant"  # flag beats file; file beats default
    assert args.tensor_model_parallel_size == 1 and args.eval_data == ["c=3.jsonl"]
    assert cfg.num_steps == 3 and cfg.eps_high == 0.28 and args.hf == "from_file"
    assert args.min_lr == pytest.approx(5e-5)  # derived from the winning lr
    assert args.save == str(tmp_path / "o" / "checkpoints") and args.load == args.save
    over = tmp_path / "over.yaml"  # a second file overrides the first key by key
    over.write_text("rl:\n  num_steps: 7\n")
    args, cfg = grpo_args.parse_args(["--config", str(run), "--config", str(over), "--train-data", "t"])
    assert cfg.num_steps == 7 and cfg.eps_high == 0.28 and args.eval_data == ["a=1.jsonl", "b=2.jsonl"]


@pytest.mark.parametrize("text,msg", [
    ("parallel:\n  tensor_parallel: 2\n", "unknown key 'parallel.tensor_parallel'"),
    ("tp: 2\n", "unknown key 'tp' (a flag alias; the key is 'tensor_model_parallel_size')"),
    ("parallel:\n  lr: 0.1\n", "unknown key 'parallel.lr' (it belongs to section 'optimizer')"),
    ("optimizer:\n  lr: fast\n", "key 'optimizer.lr': expected float, got 'fast'"),
    ("parallel:\n  tensor_model_parallel_size: 1.5\n", "key 'parallel.tensor_model_parallel_size': expected int"),
    ("rl:\n  dynamic_sampling: 1\n", "key 'rl.dynamic_sampling': expected bool"),
    ("rl:\n  kl_kind: k9\n", "key 'rl.kl_kind': expected one of ['k1', 'k2', 'k3']"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_yaml_names_key_and_file(text, msg, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        grpo_args.parse_args([*REQ, str(tmp_path), "--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and str(path) in err, err


def test_rl_section_in_an_sft_config_is_refused(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text("rl:\n  num_steps: 3\n")
    with pytest.raises(SystemExit):
        sft.parse_args([*REQ, str(tmp_path), "--config", str(path)])
    assert "section 'rl' is not used by this entry point" in capsys.readouterr().err


def test_yaml_number_strings_and_required_from_file(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\nsft:\n")  # YAML 1.1 reads 1e-4 as a string; an empty section
    args = sft.parse_args([*REQ, str(tmp_path), "--config", str(path)])
    assert args.lr == 1e-4
    with pytest.raises(SystemExit) as e:
        sft.parse_args(["--config", str(path)])
    assert e.value.code == 2
    assert "the following arguments are required: --hf, --out, --train-data" in capsys.readouterr().err


def test_megatron_long_names_equal_short_aliases(tmp_path):
    out = ["--out", str(tmp_path)]
    long = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1", "--context-parallel-size", "2",
            "--lr-warmup-iters", "5", "--recompute-granularity", "full", "--use-distributed-optimizer", "false",
            "--train-iters", "9"]
    short = ["--tp", "2", "--pp", "2", "--ep", "4", "--etp", "1", "--cp", "2", "--lr-warmup-steps", "5",
             "--recompute", "full", "--no-distributed-optimizer", "--train-steps", "9"]
    a = sft.parse_args([*REQ[:-1], *out, *long])
    b = sft.parse_args([*REQ[:-1], *out, *short])
    assert a.run_config == b.run_config
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size,
            a.context_parallel_size, a.lr_warmup_iters, a.train_iters) == (2, 2, 4, 2, 5, 9)
    assert a.recompute_granularity == "full" and a.use_distributed_optimizer is False
    assert sft.parse_args([*REQ[:-1], *out, "--recompute", "none"]).recompute_granularity is None


def test_print_config_round_trip(tmp_path, capsys):
    argv = [*REQ, str(tmp_path / "o"), "--tp", "2", "--bf16", "--lr", "3e-5", "--eval-data", "id=e.jsonl",
            "--rollout-batch-size", "4", "--eps-high", "0.28", "--tis-cap", "2", "--lbl-mode", "global",
            "--lbl-alpha", "0.001", "--routing-replay", "r2"]
    args, _ = grpo_args.parse_args(argv)
    with pytest.raises(SystemExit) as e:
        grpo_args.parse_args([*argv, "--print-config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) == args.run_config
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again, cfg = grpo_args.parse_args(["--config", str(path)])
    assert again.run_config == args.run_config and again.min_lr == pytest.approx(3e-6)
    assert cfg.lbl_mode == "global" and cfg.tis_cap == 2.0 and again.eval_data == ["id=e.jsonl"]
    with pytest.raises(SystemExit):
        grpo_args.parse_args(["--config", str(path), "--print-config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("name", ["grpo_demo.yaml", "qwen3_30b_a3b_grpo.yaml"])
def test_example_yamls_print(name, tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "examples", name), "--print-config"]
    if name == "grpo_demo.yaml":  # the paths come from grpo_moe.sh
        argv += [*REQ, str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        grpo_args.parse_args(argv)
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["rl"]["n_samples_per_prompt"] == 8
    if name.startswith("qwen3"):
        assert cfg["parallel"]["expert_model_parallel_size"] == 8 and cfg["fp8"]["fp8_recipe"] == "blockwise"


def test_demo_yaml_is_the_old_grpo_stage_flags(tmp_path):
    """examples/grpo_demo.yaml == the GRPO=(...) flags grpo_moe.sh passed before it used the file."""
    old = ["--rollout-batch-size", "8", "--n-samples-per-prompt", "8", "--max-new-tokens", "96", "--temperature",
           "1.0", "--lr", "1e-4", "--lr-decay-style", "constant", "--lr-warmup-steps", "0", "--micro-batch-size",
           "8", "--num-steps", "100", "--eval-interval", "50", "--eval-n-samples", "4", "--eval-max-prompts", "64",
           "--save-interval", "10"]
    base = [*REQ, str(tmp_path)]
    a, _ = grpo_args.parse_args([*base, *old])
    b, _ = grpo_args.parse_args([*base, "--config", os.path.join(ROOT, "examples", "grpo_demo.yaml")])
    assert a.run_config == b.run_config
    assert '--config "$ROOT/examples/grpo_demo.yaml"' in open(os.path.join(ROOT, "examples", "grpo_moe.sh")).read()


def test_resume_warns_naming_changed_fields(tmp_path):
    out = tmp_path / "run"
    old, _ = grpo_args.parse_args([*REQ, str(out), "--lr", "1e-4", "--num-steps", "4"])
    ckpt = out / "checkpoints" / "iter_0000002"
    ckpt.mkdir(parents=True)
    write_config_yaml(str(ckpt / "config.yaml"), old.run_config)
    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
    new, _ = grpo_args.parse_args([*REQ, str(out), "--lr", "2e-4", "--num-steps", "4", "--stop-after-steps", "1"])
    with pytest.warns(ConfigChangedWarning) as rec:
        record_run_config(new, is_rank0=True)
    (msg,) = [str(w.message) for w in rec if w.category is ConfigChangedWarning]
    assert "optimizer.lr: 0.0001 -> 0.0002" in msg and "optimizer.min_lr: 1e-05 -> 2e-05" in msg
    assert "2 field(s)" in msg and "stop_after_steps" not in msg and str(ckpt / "config.yaml") in msg
    assert yaml.safe_load((out / "config.yaml").read_text()) == new.run_config
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigChangedWarning)
        record_run_config(old, is_rank0=True)  # same config: silent
        record_run_config(new, is_rank0=False)  # other ranks: nothing
        no_resume, _ = grpo_args.parse_args([*REQ, str(out), "--lr", "2e-4", "--no-resume"])
        record_run_config(no_resume, is_rank0=True)  # --no-resume: nothing is resumed, nothing compared
    assert config_to_yaml(no_resume.run_config) == (out / "config.yaml").read_text()


def test_sft_run_saves_config_in_run_dir_and_checkpoint(tiny_hf_dir, tmp_path):
    """A 2-step SFT run writes <out>/config.yaml and config.yaml in each checkpoint (in its
    MANIFEST.json); resuming it with another --clip-grad / --train-iters warns naming both fields
    with their old and new values (the longer schedule needs --override-opt_param-scheduler, see
    test_resume_with_a_changed_schedule_follows_megatrons_flags)."""
    import json

    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    from _config_runs import run_sft_warnings

    write_jsonl_atomic(tmp_path / "train.jsonl", generate("id", 40, seed=11))
    out = tmp_path / "run"
    argv = ["--hf", tiny_hf_dir, "--train-data", str(tmp_path / "train.jsonl"), "--out", str(out),
            "--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2",
            "--lr-warmup-iters", "0", "--save-interval", "1", "--device", "cpu"]
    (warned,) = run_distributed(run_sft_warnings, 1, argv)
    assert warned == []
    expect = sft.parse_args(argv).run_config
    assert yaml.safe_load((out / "config.yaml").read_text()) == expect
    for step in (1, 2):
        d = out / "checkpoints" / f"iter_{step:07d}"
        assert yaml.safe_load((d / "config.yaml").read_text()) == expect
        assert "config.yaml" in json.loads((d / "MANIFEST.json").read_text())["files"]
    (warned,) = run_distributed(run_sft_warnings, 1, [*argv, "--train-iters", "3", "--clip-grad", "0.5",
                                                      "--override-opt_param-scheduler"])
    assert len(warned) == 1 and "optimizer.clip_grad: 1.0 -> 0.5" in warned[0], warned
    assert "sft.train_iters: 2 -> 3" in warned[0] and "iter_0000002" in warned[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["clip_grad"] == 0.5
    assert "config.yaml" in json.loads((out / "checkpoints" / "iter_0000003" / "MANIFEST.json").read_text())["files"]


def test_resume_with_a_changed_schedule_follows_megatrons_flags(tiny_hf_dir, tmp_path):
    """A 2-step SFT run (cosine, lr 1e-3, min_lr 1e-4) resumed with --lr 5e-4: without a flag it is
    refused naming --lr and both of Megatron's flags (Megatron asserts with a bare message, and its
    DistributedOptimizer, which pairs param groups by max_lr, raised a bare KeyError); with
    --override-opt_param-scheduler (and a constant schedule, 3 steps) step 3 trains at exactly the
    new 5e-4; with --use-checkpoint-opt_param-scheduler at the checkpoint's cosine floor, min_lr
    1e-4, since its 2-step decay is over (Megatron's get_lr)."""
    import json

    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate
    from megatron_rl.testing import run_distributed

    from _config_runs import run_sft_warnings

    write_jsonl_atomic(tmp_path / "train.jsonl", generate("id", 40, seed=11))
    base = ["--hf", tiny_hf_dir, "--train-data", str(tmp_path / "train.jsonl"), "--seq-length", "128",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--lr-warmup-iters", "0", "--device", "cpu",
            "--lr", "1e-3"]
    ckpts = tmp_path / "run" / "checkpoints"
    run_distributed(run_sft_warnings, 1, [*base, "--out", str(tmp_path / "run"), "--train-iters", "2"])
    resumed = [*base, "--load", str(ckpts), "--lr", "5e-4", "--lr-decay-style", "constant", "--train-iters", "3"]
    with pytest.raises(RuntimeError, match="ScheduleMismatchError") as e:
        run_distributed(run_sft_warnings, 1, [*resumed, "--out", str(tmp_path / "refused")])
    for part in ("max_lr (--lr): checkpoint 0.001, this run 0.0005", "--override-opt_param-scheduler",
                 "--use-checkpoint-opt_param-scheduler", str(ckpts / "iter_0000002")):
        assert part in str(e.value)
    for flag, lr in (("--override-opt_param-scheduler", 5e-4), ("--use-checkpoint-opt_param-scheduler", 1e-4)):
        out = tmp_path / flag.strip("-")
        run_distributed(run_sft_warnings, 1, [*resumed, "--out", str(out), flag])
        recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
        (step3,) = [r for r in recs if r.get("step") == 3 and "train/lr" in r]
        assert step3["train/lr"] == pytest.approx(lr, rel=1e-12), flag


def test_schedule_check_refuses_a_changed_schedule_unless_flat_or_flagged():
    """checkpointing.check_schedule against a real Megatron OptimizerParamScheduler: a changed
    length is refused for a cosine LR (naming the field) and accepted for a constant one (the
    checkpoint's length is taken, so Megatron's own equality check then passes); either flag
    skips the check."""
    from types import SimpleNamespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_rl.train.checkpointing import ScheduleMismatchError, check_schedule

    def sched(style, steps, **flags):
        return OptimizerParamScheduler(SimpleNamespace(param_groups=[{}]), init_lr=0.0, max_lr=1e-3,
                                       min_lr=1e-4, lr_warmup_steps=0, lr_decay_steps=steps, lr_decay_style=style,
                                       start_wd=0.0, end_wd=0.0, wd_incr_steps=steps, wd_incr_style="constant",
                                       use_checkpoint_opt_param_scheduler=False, **flags)

    with pytest.raises(ScheduleMismatchError, match=r"lr_decay_steps \(the schedule length.*checkpoint 2, this run 3"):
        check_schedule(sched("cosine", 3), sched("cosine", 2).state_dict(), "ckpt/iter_0000002")
    flat = sched("constant", 3)
    check_schedule(flat, sched("constant", 2).state_dict(), "ckpt")
    assert flat.lr_decay_steps == 2 and flat.wd_incr_steps == 2
    flat.load_state_dict(sched("constant", 2).state_dict())  # Megatron's check agrees now
    with pytest.raises(ScheduleMismatchError, match=r"max_lr \(--lr\)"):
        other = sched("constant", 2)
        other.max_lr = 5e-4
        check_schedule(other, sched("constant", 2).state_dict(), "ckpt")
    check_schedule(sched("cosine", 3, override_opt_param_scheduler=True), sched("cosine", 2).state_dict(), "c")


def test_readme_reference_is_generated_from_the_tree(tmp_path):
    from conftest import load_tool

    gen = load_tool("gen_config_docs")
    assert gen.main(["--check"]) == 0, "README.md is stale: run tools/gen_config_docs.py"
    text = open(os.path.join(ROOT, "README.md")).read()
    for d in ALL_SECTIONS:  # every key of the tree, with its help, is in the README once
        for f in dataclasses.fields(d):
            assert text.count(f"| `{f.name}` | `--{f.name.replace('_', '-')}`") == 1, f.name
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("| `lr` | `--lr` |", "| `lr` | `--learning-rate` |"))
    assert gen.main(["--check", "--readme", str(stale)]) == 1
    assert gen.main(["--readme", str(stale)]) == 0 and stale.read_text() == text


@pytest.mark.parametrize("parse", [sft.parse_args, grpo_args.parse_args], ids=["sft", "grpo"])
def test_help_lists_megatron_spelling_first(parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--tensor-model-parallel-size TENSOR_MODEL_PARALLEL_SIZE, --tp" in out and "--config RUN.yaml" in out
