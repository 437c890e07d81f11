"""GRPO-family RL of a Megatron-Core MoE model with rollout engines (embedded / SGLang).

    python -m megatron_rl.train.grpo --hf MODEL_DIR --train-data prompts.jsonl \
        --eval-data id=eval.jsonl --out RUN --num-engines 2 --rollout-batch-size 8 \
        --n-samples-per-prompt 4 --max-new-tokens 64 --num-steps 100 --mini-batches-per-rollout 1

One process per trainer rank (``torchrun`` / ``srun``). Rank 0 starts the engines + router and is
the only rank that talks HTTP; rollouts and rewards are broadcast to every rank. ``rl_step`` is
the whole algorithm, top-down: prompts -> engines -> rewards -> advantages -> old logprobs (+
mismatch metrics, TIS) -> k mini-batch updates -> versioned weight sync -> metrics.
Left out (absent, not half-wired): KL to a reference model, dynamic sampling, async one-step-off
rollouts, HPT, sequence packing of rollouts, routing replay, colocated memory release.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch

from megatron_rl.losses.advantages import grpo_advantages, rloo_advantages
from megatron_rl.losses.mismatch import mismatch_correction
from megatron_rl.rollout.client import SamplingParams
from megatron_rl.rollout.rewards import Verifier, synthetic_verifier
from megatron_rl.train.engine import Trainer, train_step
from megatron_rl.train.logprobs import compute_logprobs
from megatron_rl.train.rl_batch import LossStats, PolicyLossSettings, microbatches, policy_forward_step
from megatron_rl.train.rl_config import ADVANTAGES, RLConfig
from megatron_rl.train.rl_rollout import RolloutService, rollout_stats


def rl_step(tr: Trainer, cfg: RLConfig, svc: RolloutService, weights, prompts: list[list[int]],
            labels: list[str], *, step: int, pad_id: int) -> dict:
    """One RL step (policy version step-1 -> step). Collective over every trainer rank.

    Args: tr: the trainer; cfg: the run config; svc: rollout service; weights: ``WeightSync``;
        prompts / labels: the P prompts (token ids) and verifier labels of this step;
        step: the new policy version (1-based), pushed to the engines at the end.
    Returns: rollout/*, mismatch/*, train/*, perf/* metrics (identical on every rank except
        the driver-only perf/rollout_time_s and perf/reward_time_s).
    """
    from megatron.core import parallel_state as ps

    metrics, t_step = {}, time.perf_counter()
    # 1-2. prompts -> engines (n samples each, engine logprobs) -> rewards; the same on every rank
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop_token_ids=svc.stop_token_ids, seed=(cfg.seed * 7919 + step) * cfg.num_samples)
    samples, times = svc.rollout(prompts, labels, cfg.n_samples_per_prompt, sampling, tag=f"step{step}")
    metrics.update(times | rollout_stats(samples, cfg.n_samples_per_prompt))
    # 3. group-wise advantages [P, n] (failed verifier: reward NaN -> 0 here, masked in the loss)
    rewards = torch.tensor([s.reward for s in samples]).nan_to_num(0.0).view(-1, cfg.n_samples_per_prompt)
    adv = (rloo_advantages(rewards)[0] if cfg.advantage == "rloo" else
           grpo_advantages(rewards, normalize_std=cfg.advantage == "grpo")[0]).reshape(-1)
    # 4. this DP rank's shard -> k mini-batches of padded micro-batches
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    k, per_rank = cfg.mini_batches_per_rollout, len(samples) // dp
    if len(samples) % (dp * k):
        raise ValueError(f"{len(samples)} samples do not split into {dp} DP ranks x {k} mini-batches")
    seq_len = max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
    lo, m = dp_rank * per_rank, per_rank // k
    minis = [microbatches(samples[lo + j * m: lo + (j + 1) * m], adv[lo + j * m: lo + (j + 1) * m],
                          cfg.micro_batch_size, seq_len, pad_id) for j in range(k)]
    # 5. old logprobs under the rollout policy (no grad) + rollout/trainer mismatch (+ TIS weights)
    t0 = time.perf_counter()
    metrics.update(attach_old_logprobs(tr, [mb for mini in minis for mb in mini], cfg.tis_cap))
    metrics["perf/logprob_time_s"] = time.perf_counter() - t0
    # 6. k optimizer steps, each a token-mean over its global mini-batch
    t0, settings = time.perf_counter(), PolicyLossSettings(
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.loss_agg, max_response_len=cfg.max_new_tokens)
    losses, clip, norms = [], [], []
    for j, mini in enumerate(minis):
        num_tokens, num_seqs = global_counts(mini)
        stats = LossStats()
        out = train_step(tr, mini, forward_step=policy_forward_step(settings, num_tokens, num_seqs, stats))
        red = stats.reduce()
        if j == 0:
            metrics["train/ratio_max_abs_dev_first_minibatch"] = red["ratio_max_abs_dev"]
        losses.append(out["train/loss"])
        clip.append(red["train/clip_frac"])
        norms.append(out["train/grad_norm"])
    versions = [int(s.weight_version) for s in samples if (s.weight_version or "").isdigit()]
    rl_lag = (step - 1 - min(versions)) if versions else 0  # RL steps the samples are behind
    metrics.update({"train/loss": sum(losses) / k, "train/clip_frac": sum(clip) / k,
                    "train/grad_norm": sum(norms) / k, "train/lr": out["train/lr"],
                    "train/policy_version_lag": rl_lag * k + (k - 1) / 2})  # in optimizer steps
    metrics["perf/train_time_s"] = time.perf_counter() - t0
    # 7. versioned weight sync Megatron -> engines (version = step)
    sync = weights.sync(tr.model, tr.hf_config, version=step)
    metrics["perf/sync_time_s"] = sync["perf/sync_time_s"]
    # 8. throughput
    metrics["perf/step_time_s"] = dt = time.perf_counter() - t_step
    metrics["perf/tokens_per_s"] = sum(len(s.prompt_ids) + len(s.output_ids) for s in samples) / dt
    return metrics


def attach_old_logprobs(tr: Trainer, mbs: list[dict], tis_cap: float | None) -> dict:
    """Set ``old_logprobs`` [B, S] (and ``is_weights`` with a TIS cap) on every micro-batch.

    Returns mismatch/{logprob_abs_diff, k3_kl, masked_frac} token-weighted over the DP group.
    """
    from megatron.core import parallel_state as ps

    acc = torch.zeros(4, dtype=torch.float64)  # tokens, |dlogp| sum, k3 sum, masked sum
    for mb in mbs:
        old = torch.zeros_like(mb["rollout_logprobs"])
        old[:, :-1] = compute_logprobs(tr, mb["tokens"])  # [B, S-1] in the label frame
        mb["old_logprobs"] = old
        weights, keep, mm = mismatch_correction(old, mb["rollout_logprobs"], mb["loss_mask"], tis_cap=tis_cap)
        n = float(mb["loss_mask"].sum())
        acc += torch.tensor([n, float(mm["mismatch/abs_logp_diff"]) * n, float(mm["mismatch/k3_kl"]) * n,
                             float(mm["mismatch/masked_frac"]) * n], dtype=torch.float64)
        mb["loss_mask"] = keep.float()
        if weights is not None:
            mb["is_weights"] = weights
    torch.distributed.all_reduce(acc, group=ps.get_data_parallel_group())
    n = acc[0].clamp(min=1)
    return {"mismatch/logprob_abs_diff": float(acc[1] / n), "mismatch/k3_kl": float(acc[2] / n),
            "mismatch/masked_frac": float(acc[3] / n)}


def global_counts(mini: list[dict]) -> tuple[int, int]:
    """(valid tokens, rows with >= 1 valid token) of a mini-batch, summed over the DP group."""
    from megatron.core import parallel_state as ps

    c = torch.zeros(2, dtype=torch.float64)
    for mb in mini:
        c += torch.tensor([float(mb["loss_mask"].sum()), float((mb["loss_mask"].sum(-1) > 0).sum())],
                          dtype=torch.float64)
    torch.distributed.all_reduce(c, group=ps.get_data_parallel_group())
    return int(c[0]), int(c[1])


def parse_args(argv=None) -> tuple[argparse.Namespace, RLConfig]:
    from megatron_rl.train.sft import add_common_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    d = p.add_argument_group("data / rollout")
    d.add_argument("--train-data", required=True, help="jsonl of prompts with a 'label'")
    d.add_argument("--eval-data", action="append", default=[], help="NAME=PATH, repeatable")
    d.add_argument("--num-engines", type=int, default=2)
    d.add_argument("--engine-kind", default="embedded", choices=["embedded", "sglang"])
    r = p.add_argument_group("rl")
    r.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step")
    r.add_argument("--n-samples-per-prompt", type=int, default=4)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--num-steps", type=int, default=10)
    r.add_argument("--mini-batches-per-rollout", type=int, default=1, help="1 = fully on-policy")
    r.add_argument("--micro-batch-size", type=int, default=4)
    r.add_argument("--advantage", default="grpo", choices=ADVANTAGES)
    r.add_argument("--eps-low", type=float, default=0.2)
    r.add_argument("--eps-high", type=float, default=0.2)
    r.add_argument("--tis-cap", type=float, default=None)
    r.add_argument("--eval-interval", type=int, default=0, help="0: only at the end")
    r.add_argument("--eval-n-samples", type=int, default=4)
    r.add_argument("--eval-max-prompts", type=int, default=64)
    args = p.parse_args(argv)
    if args.num_engines < 1:
        p.error(f"--num-engines must be >= 1, got {args.num_engines}")
    for spec in args.eval_data:
        if "=" not in spec:
            p.error(f"--eval-data expects NAME=PATH, got {spec!r}")
    try:
        cfg = RLConfig(**{f: getattr(args, f) for f in RLConfig.__dataclass_fields__})
    except ValueError as e:
        p.error(str(e))
    args.train_steps = cfg.num_steps * cfg.mini_batches_per_rollout  # LR schedule in optimizer steps
    return args, cfg


@contextmanager
def _engines(args):
    """Rank 0: EngineLauncher (engines + router) for the run; other ranks: nothing."""
    if torch.distributed.get_rank() != 0:
        yield None
        return
    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig

    cfg = LaunchConfig(model_path=args.hf, num_engines=args.num_engines, engine_kind=args.engine_kind,
                       router=True, log_dir=os.path.join(args.out, "engine_logs"))
    with EngineLauncher(cfg) as launcher:
        yield launcher


def main(argv=None, *, verifier: Verifier = synthetic_verifier) -> dict:
    """Run (or resume) a GRPO job; ``verifier(response, label) -> float`` scores the samples.

    Returns, on rank 0, {"step", "engine_versions"} (each engine's final weight_version); else {}.
    """
    from megatron_rl.data.chat import build_prompt_ids, end_of_turn_id
    from megatron_rl.data.jsonl import load_jsonl
    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.rollout.client import SGLangClient
    from megatron_rl.rollout.weight_sync import WeightSync
    from megatron_rl.train import checkpointing as ckpt
    from megatron_rl.train.logging import MetricsLogger
    from megatron_rl.train.rl_batch import PromptStream
    from megatron_rl.train.sft import setup

    args, cfg = parse_args(argv)
    tr, tok, _ = setup(args)
    rank0 = torch.distributed.get_rank() == 0
    stream = PromptStream(load_jsonl(args.train_data), cfg.seed)
    evals = {}
    for spec in args.eval_data:
        name, path = spec.split("=", 1)
        rows = load_jsonl(path)[: cfg.eval_max_prompts]
        evals[name] = ([build_prompt_ids(tok, r) for r in rows], [r["label"] for r in rows])
    root = os.path.join(args.out, "checkpoints")
    state = None if args.no_resume else ckpt.load_checkpoint(root, tr)
    step = 0 if state is None else state["step"]
    if state is not None:
        stream.load_state_dict(state["data"])
    log = MetricsLogger(args.out, enabled=rank0, resume_step=step)
    eot = end_of_turn_id(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    result = {}
    with _engines(args) as launcher:
        svc = RolloutService(engine_urls=launcher.engine_urls if launcher else None,
                             router_url=launcher.router_url if launcher else None, tokenizer=tok,
                             verifier=verifier, stop_token_ids=() if eot is None else (eot,))
        weights = WeightSync(SGLangClient(launcher.engine_urls) if launcher else None)
        weights.sync(tr.model, tr.hf_config, version=step)  # engines start from the (resumed) policy
        eval_sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens, stop_token_ids=svc.stop_token_ids,
                                       seed=cfg.seed)
        if evals and step == 0:  # the "before" row of the eval table
            log.log(0, svc.evaluate(evals, cfg.eval_n_samples, eval_sampling))
        while step < cfg.num_steps:
            rows = stream.take(cfg.rollout_batch_size)
            prompts = [build_prompt_ids(tok, r) for r in rows]
            metrics = rl_step(tr, cfg, svc, weights, prompts, [r["label"] for r in rows], step=step + 1,
                              pad_id=pad_id)
            step += 1
            last = step == cfg.num_steps
            if evals and ((cfg.eval_interval and step % cfg.eval_interval == 0) or last):
                metrics.update(svc.evaluate(evals, cfg.eval_n_samples, eval_sampling))
            log.log(step, metrics)
            if (cfg.save_interval and step % cfg.save_interval == 0) or last:
                ckpt.save_checkpoint(root, step, tr, {"data": stream.state_dict()})
        if rank0:
            result = {"step": step, "engine_versions": weights.check_versions(step)}
    log.close()
    destroy_parallel()
    return result


if __name__ == "__main__":
    main()
