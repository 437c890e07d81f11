"""Fault injection: every fault of issue 14 injected for real, checked against an independent
reference (a float64 formula, the intact file's bytes, an uninterrupted run).

Failed rewards (raised / NaN / inf) -> left out of the group statistics and the loss; corrupted,
truncated and disk-full checkpoints; killed conversions; bad data rows; engine and router
processes SIGKILLed during rollout and weight sync (tests/test_engine_supervision.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_rl.losses.advantages import group_advantages
from megatron_rl.rollout.rewards import RewardFailureError, RewardRunner
from megatron_rl.train.rl_batch import Sample

NAN, INF = float("nan"), float("inf")


def _ref_group(rewards: list[float], estimator: str) -> list[float | None]:
    """float64 reference, written from the papers: the finite rewards of one group only.

    GRPO: (r - mean) / (std_bessel + 1e-6); Dr. GRPO: r - mean; RLOO: r - mean of the others.
    None where the sample carries no loss (non-finite, or fewer than 2 finite in its group)."""
    ok = [r for r in rewards if math.isfinite(r)]
    if len(ok) < 2:
        return [None] * len(rewards)
    m = sum(ok) / len(ok)
    sd = math.sqrt(sum((r - m) ** 2 for r in ok) / (len(ok) - 1))
    out = []
    for r in rewards:
        if not math.isfinite(r):
            out.append(None)
        elif estimator == "grpo":
            out.append((r - m) / (sd + 1e-6))
        elif estimator == "dr_grpo":
            out.append(r - m)
        else:  # rloo
            out.append(r - (sum(ok) - r) / (len(ok) - 1))
    return out


def test_failed_reward_left_out_of_group_stats_hand_computed():
    adv, carries = group_advantages(torch.tensor([[1.0, NAN, 0.0, 1.0]], dtype=torch.float64), "grpo")
    # the hand computation: [0.577, -1.155, 0.577] for the 3 valid samples
    assert carries.tolist() == [[True, False, True, True]]
    got = adv[carries].tolist()
    assert got == pytest.approx([1 / math.sqrt(3), -2 / math.sqrt(3), 1 / math.sqrt(3)], abs=1e-5)
    assert got == pytest.approx([0.577, -1.155, 0.577], abs=1e-3)
    assert adv[0, 1] == 0.0


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_failed_rewards_against_float64_reference(estimator):
    groups = [[1.0, NAN, 0.0, 1.0], [INF, 0.0, 1.0, 0.5], [NAN, NAN, 1.0, NAN], [-INF, NAN, INF, NAN],
              [0.0, 1.0, 1.0, 0.0], [0.3, 0.3, NAN, 0.3]]
    adv, carries = group_advantages(torch.tensor(groups, dtype=torch.float64), estimator)
    for g, rewards in enumerate(groups):
        ref = _ref_group(rewards, estimator)
        for i, r in enumerate(ref):
            assert bool(carries[g, i]) == (r is not None), (g, i)
            assert float(adv[g, i]) == pytest.approx(0.0 if r is None else r, abs=1e-9), (g, i)
    assert torch.isfinite(adv).all()


def test_reinforce_pp_batch_stats_ignore_failed():
    groups = [[1.0, NAN, 0.0, 1.0], [0.0, 1.0, INF, 0.0], [1.0, NAN, NAN, NAN]]
    adv, carries = group_advantages(torch.tensor(groups, dtype=torch.float64), "reinforce_pp")
    a = []  # group-mean baseline over finite rewards, then population whitening over carried samples
    for rewards in groups:
        ok = [r for r in rewards if math.isfinite(r)]
        if len(ok) >= 2:
            a += [r - sum(ok) / len(ok) for r in ok]
    mu = sum(a) / len(a)
    sd = math.sqrt(sum((x - mu) ** 2 for x in a) / len(a))
    assert adv[carries].tolist() == pytest.approx([(x - mu) / (sd + 1e-6) for x in a], abs=1e-9)
    assert not carries[2].any() and (adv[~carries] == 0).all()


def test_verifier_nan_inf_and_raise_are_failures_named_in_error():
    def verifier(response, label):
        if response == "raise":
            raise ZeroDivisionError("boom")
        return {"nan": NAN, "inf": INF, "-inf": -INF}.get(response, float(response))

    responses = ["1", "nan", "0", "1"] + ["inf", "1", "0", "-inf"] + ["raise", "0", "1", "1"] + ["1"] * 28
    res = RewardRunner(verifier, max_failure_rate=0.1).score_sync(responses, ["x"] * 40, group_size=4)
    assert res.failed.nonzero()[0].tolist() == [1, 4, 7, 8]
    assert np.isnan(res.rewards[[1, 4, 7, 8]]).all() and "non-finite reward nan" in res.errors[1]
    assert res.metrics["reward/failure_rate"] == pytest.approx(4 / 40)
    assert res.group_mean[0] == pytest.approx(2 / 3)  # NaN left out of the runner's own stats
    with pytest.raises(RewardFailureError, match=r"sample 1 \(group 0, label 'x'\): ValueError: .*non-finite"):
        RewardRunner(verifier, max_failure_rate=0.05).score_sync(responses, ["x"] * 40, group_size=4)


def test_rl_step_selection_drops_failed_and_single_valid_groups():
    """rl_step's path: rewards -> group_advantages -> select_training_samples. A failed sample, an
    inf one and every sample of a group with < 2 finite rewards must not reach the loss."""
    from megatron_rl.train.grpo import select_training_samples
    from megatron_rl.train.rl_config import RLConfig

    rewards = [1.0, NAN, 0.0, 1.0] + [INF, NAN, 1.0, NAN] + [0.0, 1.0, 0.0, 1.0]
    samples = [Sample(prompt_ids=[1], output_ids=[2, i], rollout_logprobs=[-1.0, -1.0], reward=r,
                      finish_reason="stop", weight_version="0") for i, r in enumerate(rewards)]
    cfg = RLConfig(rollout_batch_size=3, n_samples_per_prompt=4)
    adv, carries = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(3, 4), "grpo")
    kept, kept_adv = select_training_samples(samples, adv.reshape(-1), [{}] * 3, cfg, None, {},
                                             carries=carries.reshape(-1).tolist())
    assert [s.output_ids[1] for s in kept] == [0, 2, 3, 8, 9, 10, 11]
    ref = [r for r in _ref_group(rewards[:4], "grpo") if r is not None] + _ref_group(rewards[8:], "grpo")
    assert kept_adv.tolist() == pytest.approx(ref, abs=1e-6)  # float32 on the way to the batch


# -- data: invalid UTF-8 and over-long prompts -> DatasetError naming file:line --------------------

def test_invalid_utf8_names_file_and_line(tmp_path):
    from megatron_rl.data.jsonl import DatasetError, load_jsonl

    path = tmp_path / "rl.jsonl"
    path.write_bytes(b'{"prompt": "a", "label": "1"}\n\n{"prompt": "caf\xe9 \xff", "label": "2"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:3: invalid UTF-8 at byte 15 "):
        load_jsonl(path)
    path.write_bytes('{"prompt": "caf\u00e9 \u2713", "label": "2"}\n'.encode())  # valid multibyte passes
    assert load_jsonl(path)[0]["prompt"] == "caf\u00e9 \u2713"


def test_check_prompt_lengths_boundary(tmp_path):
    from megatron_rl.data.jsonl import DatasetError, check_prompt_lengths

    check_prompt_lengths("d.jsonl", [1, 4], [10, 48], context_length=64, max_new_tokens=16)  # 48 + 16 == 64 fits
    with pytest.raises(DatasetError, match=r"d.jsonl:4: prompt is 49 tokens; the context length is 64 and "
                                           r"max_new_tokens 16, so a prompt may have at most 48"):
        check_prompt_lengths("d.jsonl", [1, 4], [10, 49], context_length=64, max_new_tokens=16)


def test_grpo_refuses_prompt_longer_than_context(tiny_hf_dir, tmp_path):
    """The real loader: the tiny model's context is 512 tokens; line 2's prompt is ~600 tokens."""
    from megatron_rl.testing import run_distributed

    from _grpo_runs import run_grpo

    path = tmp_path / "rl.jsonl"
    path.write_text('{"prompt": "1+1", "label": "2"}\n' + '{"prompt": "%s", "label": "2"}\n' % ("7 " * 600))
    with pytest.raises(RuntimeError, match=rf"DatasetError: {path}:2: prompt is \d+ tokens; the context length "
                                           r"is 512 and max_new_tokens 16"):
        run_distributed(run_grpo, 1, ["--hf", tiny_hf_dir, "--train-data", str(path), "--out", str(tmp_path / "o"),
                                      "--max-new-tokens", "16", "--num-engines", "1"])
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


# -- conversion: dtypes kept per tensor; temp dirs of killed runs removed -----------------------

def _hf_variants(tiny: str, root: Path) -> dict[str, Path]:
    """bf16 everywhere; mixed (fp32, with a bf16 o_proj, a bf16 q_norm, an fp16 final norm);
    fused_mixed (a bf16 q_proj fused with fp32 k/v into linear_qkv). Norms re-drawn so a
    cast or swap cannot hide."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = load_file(Path(tiny) / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    base = {k: (1 + 0.2 * torch.randn(t.shape, generator=g)) if t.dim() == 1 else t for k, t in base.items()}
    edits = {"bf16": lambda k, t: t.bfloat16(),
             "mixed": lambda k, t: (t.bfloat16() if k in ("model.layers.1.self_attn.o_proj.weight",
                                                           "model.layers.2.self_attn.q_norm.weight")
                                    else t.half() if k == "model.norm.weight" else t),
             "fused_mixed": lambda k, t: t.bfloat16() if k == "model.layers.0.self_attn.q_proj.weight" else t}
    out = {}
    for name, edit in edits.items():
        d = root / name
        shutil.copytree(tiny, d)
        save_file({k: edit(k, t).contiguous() for k, t in base.items()}, d / "model.safetensors",
                  metadata={"format": "pt"})
        out[name] = d
    return out


def _convert_rank(rank: int, world: int, tiny: str, root: str) -> dict:
    from conftest import load_tool

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    main, r, errors = load_tool("convert").main, Path(root), {}
    for name, src in _hf_variants(tiny, r).items():
        try:
            main(["hf-to-mcore", "--hf", str(src), "--out", str(r / f"{name}_mc")])
            main(["mcore-to-hf", "--ckpt", str(r / f"{name}_mc"), "--out", str(r / f"{name}_hf")])
        except Exception as e:  # noqa: BLE001 - the message is the result
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    from megatron_rl.testing import run_distributed

    root = tmp_path_factory.mktemp("conv")
    return root, run_distributed(_convert_rank, 1, tiny_hf_dir, str(root))[0]


def _read_hf(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", ["bf16", "mixed"])
def test_conversion_keeps_every_dtype_byte_identical(converted, name):
    root, errors = converted
    assert name not in errors, errors[name]
    want, got = _read_hf(root / name), _read_hf(root / f"{name}_hf")
    assert set(got) == set(want)
    for k, w in want.items():  # the input file is the reference
        assert got[k].dtype == w.dtype, f"{k}: {got[k].dtype} vs {w.dtype}"
        assert got[k].contiguous().view(torch.uint8).numpy().tobytes() == w.view(torch.uint8).numpy().tobytes(), k
    if name == "mixed":
        assert want["model.norm.weight"].dtype == torch.float16
        assert want["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16


def test_conversion_refuses_a_fused_tensor_of_mixed_dtypes(converted):
    root, errors = converted
    msg = errors["fused_mixed"]
    assert msg.startswith("CheckpointError") and "different dtypes" in msg, msg
    assert "model.layers.0.self_attn.q_proj.weight torch.bfloat16" in msg
    assert "model.layers.0.self_attn.k_proj.weight torch.float32" in msg
    assert not (root / "fused_mixed_mc").exists()


def test_killed_conversion_temp_dir_removed_by_next_run(converted, tmp_path):
    """SIGKILL a real ``tools/convert.py mcore-to-hf`` once its temp dir exists; the next run
    removes it (its pid is dead) but leaves a live process's temp dir and a dir without owner."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from megatron_rl.checkpoint.mcore_io import OWNER

    root, _ = converted
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "hf_out"
    cmd = [sys.executable, str(repo / "tools" / "convert.py"), "mcore-to-hf", "--ckpt", str(root / "mixed_mc"),
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(f"{out}.tmp-{proc.pid}")
    deadline = time.monotonic() + 300
    while not (tmp / OWNER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not out.exists(), "the kill came too late to leave a temp dir"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live_tmp = Path(f"{out}.tmp-{live.pid}")
        live_tmp.mkdir()
        (live_tmp / OWNER).write_text(f"{os.uname().nodename} {live.pid}\n")
        no_owner = Path(f"{out}.tmp-999999999")
        no_owner.mkdir()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        assert not tmp.exists()  # the killed run's
        assert live_tmp.is_dir() and no_owner.is_dir()  # a live writer's, an unknown writer's
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    finally:
        live.kill()
        live.wait()
    assert _read_hf(out).keys() == _read_hf(root / "mixed").keys()


# -- checkpoints: manifest verified on resume, fallback, disk full --------------------------------

@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from megatron_rl.data.jsonl import write_jsonl_atomic
    from megatron_rl.data.synthetic import generate

    d = tmp_path_factory.mktemp("sftdata")
    write_jsonl_atomic(d / "train.jsonl", generate("id", 40, seed=11))
    return d / "train.jsonl"


def _sft_argv(hf: str, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--hf", hf, "--train-data", str(data), "--out", str(out), "--seq-length", "128",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-steps", str(steps),
            "--save-interval", "1", "--lr-warmup-steps", "0", "--seed", "3", *extra]


def _rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]  # every row whole JSON


def test_manifest_catches_a_single_flipped_bit_truncation_and_loss(tmp_path):
    """No process group (rank 0 of 1): every kind of damage is named; the crc32 is zlib's over the
    whole file (reference: zlib.crc32 of the bytes read at once)."""
    import json
    import zlib

    from megatron_rl.train.ckpt_integrity import MANIFEST, CheckpointCorruptError, verify_manifest, write_manifest

    d = tmp_path / "iter_0000001"
    (d / "rng").mkdir(parents=True)
    payload = bytes(range(256)) * 40_000  # 10.24 MB: more than one 8 MiB read chunk
    (d / "a.distcp").write_bytes(payload)
    (d / "rng" / "rank0.pt").write_bytes(b"rng")
    m = write_manifest(str(d))
    assert json.loads((d / MANIFEST).read_text()) == m
    assert m["files"]["a.distcp"] == {"size": len(payload), "crc32": f"{zlib.crc32(payload):08x}"}
    verify_manifest(str(d))
    flipped = bytearray(payload)
    flipped[5_000_000] ^= 0x01
    (d / "a.distcp").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointCorruptError, match=r"a.distcp: contents changed"):
        verify_manifest(str(d))
    (d / "a.distcp").write_bytes(payload[:-1])
    (d / "rng" / "rank0.pt").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"a.distcp: truncated: 10239999 bytes, the manifest says 10240000; .*rank0.pt: missing"):
        verify_manifest(str(d))
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointCorruptError, match=r"MANIFEST.json: missing"):
        verify_manifest(str(d))


def test_damaged_checkpoint_refused_then_fallback_resumes_exactly(tiny_hf_dir, sft_data, tmp_path):
    from megatron_rl.testing import run_distributed
    from megatron_rl.train.ckpt_integrity import verify_manifest

    from _fault_runs import sft_attempts

    out = tmp_path / "run"
    ck = out / "checkpoints"
    it = {s: ck / f"iter_{s:07d}" for s in (1, 2, 3)}
    res = run_distributed(sft_attempts, 1, [
        ([], _sft_argv(tiny_hf_dir, sft_data, out, 3)),  # the uninterrupted run: 3 checkpoints
        ([("copy", out / "metrics.jsonl", tmp_path / "ref.jsonl"), ("zero", it[3] / "__0_0.distcp", 4096),
          ("truncate", it[3] / "rng" / "rank0.pt")], _sft_argv(tiny_hf_dir, sft_data, out, 4)),
        ([("copy", out / "metrics.jsonl", tmp_path / "after_refusal.jsonl"), ("truncate", it[2] / "__0_0.distcp"),
          ("mkdir", ck / "iter_0000009.tmp")],
         _sft_argv(tiny_hf_dir, sft_data, out, 3, "--resume-fallback")),
    ])[0]
    assert res[0] is None and res[2] is None, res
    err = res[1]
    assert err.startswith("CheckpointCorruptError") and "--resume-fallback" in err, err
    assert f"{it[3] / '__0_0.distcp'}: contents changed" in err
    assert f"{it[3] / 'rng' / 'rank0.pt'}: truncated" in err
    # the refused resume wrote nothing: metrics unchanged
    assert (tmp_path / "after_refusal.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    # the fallback skipped iter 3 (altered) and 2 (truncated), resumed from 1 and re-ran 2..3
    # exactly as the uninterrupted run did; each step has one whole metrics row
    ref = {r["step"]: r["train/loss"] for r in _rows(tmp_path / "ref.jsonl")}
    got = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert {r["step"]: r["train/loss"] for r in got} == ref
    for s in (1, 2, 3):  # re-saved checkpoints are intact
        verify_manifest(str(it[s]))
    assert not (ck / "iter_0000009.tmp").exists()  # a killed save's temp dir, removed by the next save


def _mount_tmpfs(path: Path, size: str) -> None:
    import subprocess

    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the disk-full test needs root")


def test_disk_full_save_says_so_and_keeps_previous_checkpoint(tiny_hf_dir, sft_data, tmp_path):
    """Real full file systems (tmpfs): 20 MB < one checkpoint (31 MB) fails mid-write; 48 MB holds
    one checkpoint and refuses the second up front. The previous checkpoint stays loadable."""
    import shutil
    import subprocess

    from megatron_rl.testing import run_distributed
    from megatron_rl.train.ckpt_integrity import verify_manifest

    from _fault_runs import sft_attempts

    small, big = tmp_path / "small", tmp_path / "big"
    _mount_tmpfs(small, "20m")
    try:
        _mount_tmpfs(big, "48m")
        try:
            res = run_distributed(sft_attempts, 1, [
                ([], _sft_argv(tiny_hf_dir, sft_data, small / "run", 1)),
                ([], _sft_argv(tiny_hf_dir, sft_data, big / "run", 1)),
                ([], _sft_argv(tiny_hf_dir, sft_data, big / "run", 2, "--override-opt_param-scheduler")),  # longer schedule
                ([], _sft_argv(tiny_hf_dir, sft_data, big / "run", 1)),  # resume from iter 1: loads it
            ])[0]
            ck_small, ck_big = small / "run" / "checkpoints", big / "run" / "checkpoints"
            assert res[0].startswith("CheckpointSaveError: no space left on device while saving checkpoint "
                                     f"{ck_small / 'iter_0000001'}"), res[0]
            assert not (ck_small / "iter_0000001.tmp").exists() and not (ck_small / "iter_0000001").exists()
            assert shutil.disk_usage(small).free > 15 << 20  # the temp dir's space was given back
            assert [r["step"] for r in _rows(small / "run" / "metrics.jsonl")] == [1]
            assert res[1] is None and res[3] is None, res
            assert res[2].startswith(f"CheckpointSaveError: no space left on device for a checkpoint under {ck_big}")
            assert sorted(p.name for p in ck_big.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
            assert (ck_big / "latest_checkpointed_iteration.txt").read_text() == "1"
            verify_manifest(str(ck_big / "iter_0000001"))
            # step 2's row went with its unsaved state: the resume from step 1 truncates rows > 1
            assert [r["step"] for r in _rows(big / "run" / "metrics.jsonl")] == [1]
        finally:
            subprocess.run(["umount", str(big)], check=False)
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- a real GRPO run survives a SIGKILLed engine ----------------------------------------------------

def test_grpo_survives_an_engine_sigkill(tiny_hf_dir, sft_data, tmp_path):
    """Two real embedded engines + router; one engine SIGKILLed after step 1's rollout (the
    issue's failure: the weight sync then died on /pause_generation). The run completes 3 steps,
    the engine is restarted and synced, both engines end at version 3, every step has one row."""
    from megatron_rl.testing import run_distributed

    from _fault_runs import grpo_with_engine_kill

    out = tmp_path / "run"
    argv = ["--hf", tiny_hf_dir, "--train-data", str(sft_data), "--out", str(out), "--num-engines", "2",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--max-new-tokens", "8",
            "--num-steps", "3", "--mini-batches-per-rollout", "1", "--micro-batch-size", "4", "--lr", "1e-3",
            "--lr-warmup-steps", "0", "--seed", "5"]
    (res,) = run_distributed(grpo_with_engine_kill, 1, argv)
    assert res["step"] == 3 and sorted(res["engine_versions"].values()) == ["3", "3"], res
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/engine_restarts"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
