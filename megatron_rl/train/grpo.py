"""GRPO-family RL of a Megatron-Core MoE model with rollout engines (embedded / SGLang).

    python -m megatron_rl.train.grpo --hf MODEL_DIR --train-data prompts.jsonl \
        --eval-data id=eval.jsonl --out RUN --num-engines 2 --rollout-batch-size 8 \
        --n-samples-per-prompt 4 --max-new-tokens 64 --num-steps 100 --mini-batches-per-rollout 1

One process per trainer rank (``torchrun`` / ``srun``). Rank 0 starts the engines + router and is
the only rank that talks HTTP; rollouts and rewards are broadcast to every rank. The loop, top-down:
``RolloutProducer.get`` (prompts -> engines, n samples each -> rewards; dynamic sampling; one-step-off
async) -> ``rl_step``: reward shaping -> advantages -> which samples train (overlong filter, HPT
demonstrations) -> DP shard, padded or packed micro-batches -> old logprobs (routing replay R3/R2 or
recorded routes + flip rate; mismatch metrics, TIS / IcePop / sequence mask) -> reference logprobs
(KL on) -> k mini-batch updates (load balancing per mini-batch) -> versioned weight sync -> metrics;
then periodic eval and checkpoint (model, optimizer, scheduler, RNG, data cursor, rollout buffer).
Left out: colocated engines releasing memory during training (the launcher has the calls; the
loop runs engines and trainer disaggregated), multi-step-off asynchrony, a
critic (GAE exists as a loss function only), virtual pipeline stages.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rl.losses.advantages import group_advantages
from megatron_rl.losses.mismatch import mismatch_correction
from megatron_rl.losses.shaping import overlong_penalty
from megatron_rl.quant.fp8_engine import rollout_model_path
from megatron_rl.moe.routing_replay import (RoutingReplay, build_replay_routes, flip_rate_metrics, moe_layer_ids,
                                            routing_flip_counts)
from megatron_rl.rollout.client import SamplingParams
from megatron_rl.rollout.rewards import Verifier, resolve_verifier
from megatron_rl.train.engine import Trainer, train_step
from megatron_rl.train.logprobs import apply_logits_temperature, compute_logprobs
from megatron_rl.train.rl_batch import (LossStats, PolicyLossSettings, Sample, local_counts, microbatches,
                                        policy_forward_step)
from megatron_rl.train.grpo_args import engine_context_length, parse_args  # noqa: F401 - parse_args re-exported
from megatron_rl.train.rl_config import RLConfig
from megatron_rl.train.rl_rollout import RolloutProducer, RolloutService, StepBatch, rollout_stats


@dataclass(kw_only=True)
class StepContext:
    """What ``rl_step`` needs besides the config: the weight sync, the frozen reference model (KL
    on), the driver's rollout producer (drained before the sync), a row -> demonstration builder
    (HPT on), the pad id, the MoE load balancer (None for a dense model) and the token multiple
    every micro-batch row length is padded to (the FP8 recipe's GEMM alignment, 1 without FP8)."""

    weights: object
    producer: RolloutProducer
    pad_id: int
    token_multiple: int = 1
    ref_model: object = None
    demo: Callable[[dict], Sample] | None = None
    balance: object = None  # moe.balance.LoadBalance: router metrics, LBL, expert-bias update


def rl_step(tr: Trainer, cfg: RLConfig, ctx: StepContext, batch: StepBatch, *, step: int) -> dict:
    """One RL step (policy version step-1 -> step) on a produced rollout batch. Collective.

    Args: tr: the trainer; cfg: the run config; ctx: see ``StepContext``; batch: this step's
        scored rollout (``RolloutProducer.get``: prompts -> engines -> rewards, already done, with
        dynamic sampling / one-step-off as configured); step: the new policy version, pushed to
        the engines at the end.
    Returns: rollout/*, mismatch/*, train/*, moe/*, perf/* metrics (identical on every rank except
        the driver-only perf/*_time_s of the rollout).
    """
    metrics, t_step = dict(batch.metrics), time.perf_counter()
    samples, n = batch.samples, cfg.n_samples_per_prompt
    metrics.update(rollout_stats(samples, n))
    # 1. rewards (+ DAPO soft overlong punishment) -> group-wise advantages [P, n]
    #    failed verifications (NaN / inf reward) are left out of their group's statistics
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    if cfg.overlong_buffer:
        pen, m = overlong_penalty(torch.tensor([len(s.output_ids) for s in samples]), cfg.max_new_tokens,
                                  cfg.overlong_buffer, cfg.overlong_penalty)
        rewards, metrics = rewards + pen, metrics | m
    adv, carries = group_advantages(rewards.view(-1, n), cfg.advantage)
    adv, carries = adv.reshape(-1), carries.reshape(-1)
    metrics["reward/failure_rate"] = float((~torch.isfinite(rewards)).double().mean())
    metrics["reward/no_loss_groups"] = float((~carries.view(-1, n).any(1)).sum())
    # 2. which samples carry loss: valid reward in a group of >= 2 valid, overlong filtering, HPT
    train_samples, train_adv = select_training_samples(samples, adv, batch.rows, cfg, ctx, metrics,
                                                       carries=carries.tolist())
    # 3. this DP rank's share -> k mini-batches of micro-batches (padded rows, or packed)
    minis = shard_minibatches(train_samples, train_adv, cfg, ctx.pad_id, token_multiple=ctx.token_multiple)
    # 4. old logprobs under the rollout policy (no grad) + mismatch (TIS / IcePop / seq mask),
    #    reference logprobs when the KL is on
    t0 = time.perf_counter()
    flat = [mb for mini in minis for mb in mini]
    engine_routes = any(s.routed_experts is not None for s in train_samples)
    for mb in flat:
        routes = mb.pop("_routes")
        if engine_routes:
            mb[ENGINE_ROUTES] = build_replay_routes(routes, mb["tokens"].shape[1], *_route_layout(tr.config))
    metrics.update(attach_old_logprobs(tr, flat, cfg, engine_routes=engine_routes))
    if ctx.ref_model is not None:  # under R3 the reference routes like the engine (and the policy)
        with (RoutingReplay(ctx.ref_model, mode="replay", key=ENGINE_ROUTES) if cfg.routing_replay == "r3"
              else nullcontext()) as rr:
            for mb in flat:
                kw = {} if rr is None else {"wrap_step": rr.wrap_forward_step,
                                            "extra": {ENGINE_ROUTES: mb[ENGINE_ROUTES]}}
                mb["ref_logprobs"] = label_frame(
                    compute_logprobs(ctx.ref_model, mb["tokens"], **_layout_kwargs(mb), **kw,
                                     loss_impl=cfg.loss_impl), mb["loss_mask"])
    metrics["perf/logprob_time_s"] = time.perf_counter() - t0
    # 5. k optimizer steps, each a token-mean over its global mini-batch
    t0 = time.perf_counter()
    settings = PolicyLossSettings(eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.loss_agg,
                                  max_response_len=cfg.max_new_tokens, entropy_coef=cfg.entropy_coef,
                                  kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, loss_impl=cfg.loss_impl)
    per_mini = []
    key = replay_key(cfg)
    for j, mini in enumerate(minis):
        num_tokens, num_seqs = global_counts(mini)
        stats, moe = LossStats(), {}
        fstep = policy_forward_step(settings, num_tokens, num_seqs, stats)
        with (RoutingReplay(tr.model, mode="replay", key=key) if key else nullcontext()) as rr:
            if rr is not None:
                fstep = rr.wrap_forward_step(fstep)
            if ctx.balance is not None and num_tokens > 0:  # exact counts -> router metrics (+ LBL)
                # phase A from the routes the step uses (replayed), else an extra no-grad forward
                counts = (counts_from_routes(tr, mini, key)
                          if key and not (ctx.balance.mode == "micro" and ctx.balance.lbl_on) else None)
                moe = ctx.balance.prepare(tr, mini, local_counts=counts)
                with ctx.balance.forward_step(tr, fstep, grad_divisor=num_tokens) as lb_step:
                    out = train_step(tr, mini, forward_step=lb_step)
                moe |= ctx.balance.after_step(tr)
            else:
                out = train_step(tr, mini, forward_step=fstep)
        red = stats.reduce() | moe
        if j == 0:
            metrics["train/ratio_max_abs_dev_first_minibatch"] = red.pop("ratio_max_abs_dev")
        red.pop("ratio_max_abs_dev", None)
        per_mini.append({"train/loss": out["train/loss"], "train/grad_norm": out["train/grad_norm"], **red})
    k = len(minis)
    for key in per_mini[0]:
        metrics[key] = sum(m[key] for m in per_mini) / k
    metrics["train/lr"] = out["train/lr"]
    versions = [int(s.weight_version) for s in samples if (s.weight_version or "").isdigit()]
    rl_lag = (step - 1 - min(versions)) if versions else 0  # RL steps the samples are behind
    metrics["train/policy_version_lag"] = rl_lag * k + (k - 1) / 2  # in optimizer steps
    if versions:
        metrics["rollout/weight_version_min"] = float(min(versions))
        metrics["rollout/weight_version_max"] = float(max(versions))
    metrics["perf/train_time_s"] = time.perf_counter() - t0
    # 6. versioned weight sync Megatron -> engines (version = step), once the engines are idle
    ctx.producer.drain()
    sync = ctx.weights.sync(tr.model, tr.hf_config, version=step)
    metrics["perf/sync_time_s"] = sync["perf/sync_time_s"]
    metrics.update({k: v for k, v in sync.items() if k.startswith("rollout/")})  # engine restarts
    # 7. throughput
    metrics["perf/step_time_s"] = dt = time.perf_counter() - t_step + metrics.get("perf/produce_time_s", 0.0)
    metrics["perf/tokens_per_s"] = sum(len(s.prompt_ids) + len(s.output_ids) for s in samples) / dt
    return metrics


def select_training_samples(samples: list[Sample], adv: torch.Tensor, rows: list[dict], cfg: RLConfig,
                            ctx: StepContext, metrics: dict, *, carries: list[bool] | None = None,
                            ) -> tuple[list[Sample], torch.Tensor]:
    """Samples that enter the loss and their advantages [N'].

    Overlong filtering (DAPO sec. 3.4) drops truncated samples from the loss (their rewards still
    counted in the group baseline); HPT (``cfg.hpt_gamma``) replaces the rollouts of each prompt
    whose pass rate is <= gamma by one demonstration row (SFT loss). Failed verifications (NaN
    reward) are masked in ``collate``; samples with ``carries[i]`` False (``group_advantages``:
    non-finite reward, or fewer than 2 finite rewards in the group) are dropped. Adds
    rollout/overlong_filtered_frac, hpt/sft_prompt_frac.
    """
    n = cfg.n_samples_per_prompt
    keep = [True] * len(samples)
    if cfg.overlong_filter:
        keep = [s.finish_reason != "length" for s in samples]
        metrics["rollout/overlong_filtered_frac"] = 1.0 - sum(keep) / len(keep)
    if carries is not None:
        keep = [k and c for k, c in zip(keep, carries)]
    out, out_adv, demos = [], [], []
    for g, row in enumerate(rows):
        group = range(g * n, (g + 1) * n)
        rate = sum(samples[i].reward >= 1.0 for i in group) / n
        if cfg.hpt_gamma is not None and rate <= cfg.hpt_gamma:
            demos.append(ctx.demo(row))
            continue
        out += [samples[i] for i in group if keep[i]]
        out_adv += [float(adv[i]) for i in group if keep[i]]
    if cfg.hpt_gamma is not None:
        metrics["hpt/sft_prompt_frac"] = len(demos) / max(len(rows), 1)
    return out + demos, torch.tensor(out_adv + [0.0] * len(demos))


def shard_minibatches(samples: list[Sample], adv: torch.Tensor, cfg: RLConfig, pad_id: int, *,
                      token_multiple: int = 1) -> list[list[dict]]:
    """This DP rank's k mini-batches of micro-batches.

    The sample list is padded with fully masked dummy samples to a multiple of dp * k, so every
    DP rank runs the same number of micro-batches (the EP all-to-alls span DP ranks); rank r
    takes the r-th contiguous share, mini-batch j the j-th slice of it. Every row length (padded
    or packed) is rounded up to ``token_multiple`` with masked pad tokens (FP8 recipes need the
    GEMM's token count aligned: ``quant.fp8_training.fp8_pad_multiple``).
    """
    from megatron.core import parallel_state as ps

    dp, dp_rank, k = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), cfg.mini_batches_per_rollout
    pad = (-len(samples)) % (dp * k)
    samples = list(samples) + [dummy_sample(pad_id)] * pad
    adv = torch.cat([adv.float(), torch.zeros(pad)])
    per_rank = len(samples) // dp
    m, lo = per_rank // k, dp_rank * per_rank
    parts = [(samples[lo + j * m: lo + (j + 1) * m], adv[lo + j * m: lo + (j + 1) * m]) for j in range(k)]
    if cfg.pack_rollouts:
        from megatron_rl.train.rl_batch import pack_microbatches

        cap = cfg.pack_max_tokens or max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
        cap = -(-cap // token_multiple) * token_multiple
        minis = [pack_microbatches(part, a, cap, pad_id) for part, a in parts]
        for (part, _), mini in zip(parts, minis):
            for mb in mini:  # which sample sits where (routes are laid out from it)
                mb["_routes"] = [[] for _ in range(mb["tokens"].shape[0])]
                for idx, row, off, _n in mb["sample_index"]:
                    mb["_routes"][row].append((off, part[idx].routed_experts))
        return [_even_microbatch_count(mini, pad_id) for mini in minis]
    seq_len = max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
    seq_len = -(-seq_len // token_multiple) * token_multiple
    minis = [microbatches(part, a, cfg.micro_batch_size, seq_len, pad_id) for part, a in parts]
    r = cfg.micro_batch_size
    for (part, _), mini in zip(parts, minis):
        for i, mb in enumerate(mini):
            mb["_routes"] = [s.routed_experts for s in part[i * r:(i + 1) * r]]
            mb["_routes"] += [None] * (mb["tokens"].shape[0] - len(mb["_routes"]))
    return minis


def _even_microbatch_count(mini: list[dict], pad_id: int) -> list[dict]:
    """Pad a packed mini-batch with fully masked micro-batches to the DP group's max count."""
    from megatron.core import parallel_state as ps

    c = torch.tensor([len(mini)], dtype=torch.int64)
    torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX, group=ps.get_data_parallel_group())
    while len(mini) < int(c):
        mini.append(masked_copy(mini[0]))
    return mini


def masked_copy(mb: dict) -> dict:
    """A micro-batch with ``mb``'s shapes and no loss token (keeps DP ranks' schedules in step)."""
    out = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in mb.items()}
    out["_routes"] = [None] * out["tokens"].shape[0]
    for key in ("loss_mask", "advantages", "sft_mask"):
        if key in out and torch.is_tensor(out[key]):
            out[key] = torch.zeros_like(out[key])
    return out


def _layout_kwargs(mb: dict) -> dict:
    """compute_logprobs keywords for a (possibly packed) micro-batch."""
    return {"attention_mask": mb["attention_mask"], "position_ids": mb["position_ids"]}


def dummy_sample(pad_id: int) -> Sample:
    """A sample with no response: a fully masked row (pads the batch to an even DP split)."""
    return Sample(prompt_ids=[pad_id], output_ids=[], rollout_logprobs=[], reward=0.0,
                  finish_reason="pad", weight_version=None)


ENGINE_ROUTES, RECORDED_ROUTES = "engine_routes", "recorded_routes"


def replay_key(cfg: RLConfig) -> str | None:
    """Batch key of the routes the training passes replay (R3: the engine's, R2: the recorded)."""
    return {"r3": ENGINE_ROUTES, "r2": RECORDED_ROUTES}.get(cfg.routing_replay)


def _route_layout(config) -> tuple[int, int]:
    """(MoE layers L, top-k K) of the engine's route arrays."""
    return len(moe_layer_ids(config)), config.moe_router_topk


def counts_from_routes(tr: Trainer, mbs: list[dict], key: str) -> torch.Tensor:
    """[num_layers, E] float64 routed counts of this rank's loss tokens under the routes in
    ``mb[key]`` ([B, S, L, K]), laid out as ``GlobalLBL.set_local_counts`` expects: this PP
    stage's MoE layers only, this TP rank's sequence shard under sequence parallelism."""
    from megatron.core import parallel_state as ps

    from megatron_rl.moe.global_lbl import _routers

    cfg = tr.config
    ids, e = moe_layer_ids(cfg), cfg.num_moe_experts
    mine = {r.layer_number - 1 for r in _routers(tr.model)}
    counts = torch.zeros(cfg.num_layers, e, dtype=torch.float64)
    tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for mb in mbs:
        routes, valid = mb[key].long(), mb["loss_mask"] > 0  # [B, S, L, K], [B, S]
        if cfg.sequence_parallel and tp > 1:
            s = routes.shape[1] // tp
            routes, valid = routes[:, tpr * s:(tpr + 1) * s], valid[:, tpr * s:(tpr + 1) * s]
        for o, layer in enumerate(ids):
            if layer in mine:
                counts[layer] += torch.bincount(routes[:, :, o][valid].reshape(-1), minlength=e).double()
    return counts


def label_frame(logp: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, S-1] logprobs of tokens[:, 1:] -> [B, S] in the label frame (last position 0)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    out[:, :-1] = logp
    return out


def attach_old_logprobs(tr: Trainer, mbs: list[dict], cfg: RLConfig, *, engine_routes: bool = False) -> dict:
    """Set ``old_logprobs`` [B, S] (and ``is_weights`` with a TIS cap) on every micro-batch and
    apply IcePop / sequence masking to ``loss_mask`` (``losses.mismatch.mismatch_correction``).

    Returns mismatch/{logprob_abs_diff, k3_kl, masked_frac, tis_clip_frac (rho > cap),
    is_weight_abs_dev (mean |w - 1|, 0 without TIS)} token-weighted over the DP group.
    Demonstration rows (HPT, no engine logprobs) are excluded from the mismatch statistics.
    Routing: R3 replays the engine's routes (``ENGINE_ROUTES``) in this pass; otherwise the
    trainer's routes are recorded, kept for R2 (``RECORDED_ROUTES``) and, when the engine sent
    routes, compared with them: ``moe/routing_flip_rate`` (+ per layer) over the loss tokens.
    """
    from megatron.core import parallel_state as ps

    icepop = None if cfg.icepop_low is None else (cfg.icepop_low, cfg.icepop_high)
    seq = None if cfg.seq_mask_low is None else (cfg.seq_mask_low, cfg.seq_mask_high)
    acc = torch.zeros(6, dtype=torch.float64)  # tokens, |dlogp|, k3, masked, TIS-capped, |w - 1| sums
    routing = {}
    if cfg.routing_replay == "r3":
        routing = {"mode": "replay", "key": ENGINE_ROUTES}
    elif cfg.routing_replay == "r2" or engine_routes:
        routing = {"mode": "record"}
    with RoutingReplay(tr.model, **routing) if routing else nullcontext() as rr:
        for mb in mbs:
            kw = {} if rr is None else {"wrap_step": rr.wrap_forward_step,
                                        "extra": {ENGINE_ROUTES: mb[ENGINE_ROUTES]} if ENGINE_ROUTES in mb else {}}
            mb["old_logprobs"] = label_frame(compute_logprobs(tr, mb["tokens"], **_layout_kwargs(mb), **kw,
                                                              loss_impl=cfg.loss_impl),
                                             mb["rollout_logprobs"])
        recorded = rr.recorded_routes() if routing.get("mode") == "record" else None
    out = {}
    if recorded is not None:
        flips, n_valid = torch.zeros(0, dtype=torch.float64), 0.0
        for mb, rec in zip(mbs, recorded):
            mb[RECORDED_ROUTES] = rec
            if engine_routes:  # both [B, S, L, K]
                f, n_v = routing_flip_counts(mb[ENGINE_ROUTES], rec, mb["loss_mask"] > 0)
                flips, n_valid = (f if not flips.numel() else flips + f), n_valid + n_v
        if engine_routes:
            out = flip_rate_metrics(flips, n_valid, layer_ids=moe_layer_ids(tr.config),
                                    group=ps.get_data_parallel_group())
    for mb in mbs:
        old = mb["old_logprobs"]
        rl_mask = mb["loss_mask"].bool()
        if "sft_mask" in mb:
            rl_mask = rl_mask & ~mb["sft_mask"].bool()
        weights, keep, mm = mismatch_correction(old, mb["rollout_logprobs"], rl_mask, tis_cap=cfg.tis_cap,
                                                icepop_bounds=icepop, seq_bounds=seq)
        n = float(rl_mask.sum())
        w_dev = 0.0 if weights is None else float(((weights.double() - 1).abs() * rl_mask).sum())
        acc += torch.tensor([n, float(mm["mismatch/abs_logp_diff"]) * n, float(mm["mismatch/k3_kl"]) * n,
                             float(mm["mismatch/masked_frac"]) * n, float(mm["mismatch/tis_clip_frac"]) * n,
                             w_dev], dtype=torch.float64)
        dropped = rl_mask & ~keep
        mb["loss_mask"] = (mb["loss_mask"].bool() & ~dropped).float()
        if weights is not None:
            mb["is_weights"] = torch.where(rl_mask, weights, torch.ones_like(weights))
    torch.distributed.all_reduce(acc, group=ps.get_data_parallel_group())
    n = acc[0].clamp(min=1)
    return out | {"mismatch/logprob_abs_diff": float(acc[1] / n), "mismatch/k3_kl": float(acc[2] / n),
            "mismatch/masked_frac": float(acc[3] / n), "mismatch/tis_clip_frac": float(acc[4] / n),
            "mismatch/is_weight_abs_dev": float(acc[5] / n)}


def global_counts(mini: list[dict]) -> tuple[int, int]:
    """(loss tokens, samples with >= 1 loss token) of a mini-batch (padded or packed rows), summed
    over the DP group: the global normalisers of ``policy_loss``."""
    from megatron.core import parallel_state as ps

    c = torch.zeros(2, dtype=torch.float64)
    for mb in mini:
        c += torch.tensor([float(x) for x in local_counts(mb)], dtype=torch.float64)
    torch.distributed.all_reduce(c, group=ps.get_data_parallel_group())
    return int(c[0]), int(c[1])


@contextmanager
def _engines(args):
    """Rank 0: EngineLauncher (engines + router) for the run; other ranks: nothing."""
    if torch.distributed.get_rank() != 0:
        yield None
        return
    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig

    model_path = rollout_model_path(args.hf, args.out, args.rollout_fp8)  # FP8 copy with --rollout-fp8
    cfg = LaunchConfig(model_path=model_path, num_engines=args.num_engines, engine_kind=args.engine_kind,
                       router=True, log_dir=os.path.join(args.out, "engine_logs"),
                       extra_args=args.engine_extra_args)
    with EngineLauncher(cfg) as launcher:
        yield launcher


def load_reference_model(tr: Trainer, ref_hf: str):
    """The frozen reference policy: this rank's GPTModel chunk with ``tr``'s layout and config,
    loaded from the HF dir ``ref_hf`` (eval mode, no grad, no optimizer)."""
    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import load_hf_config
    from megatron_rl.models.base import build_model

    hf_config = load_hf_config(ref_hf)
    if hf_config.get("model_type") != tr.hf_config.get("model_type"):
        raise ValueError(f"--ref-hf {ref_hf}: model_type {hf_config.get('model_type')!r} differs from the "
                         f"policy's {tr.hf_config.get('model_type')!r}")
    config = copy.copy(tr.config)
    for hook in ("finalize_model_grads_func", "grad_scale_func", "no_sync_func"):  # the trainer's, not ours
        setattr(config, hook, None)
    model = build_model(hf_config, config, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage())
    load_hf_weights(model, ref_hf, hf_config)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def main(argv=None, *, verifier: Verifier | None = None) -> dict:
    """Run (or resume) a GRPO job; ``verifier(response, label) -> float`` scores the samples
    (None: the one ``--verifier`` names, ``rollout.rewards.resolve_verifier``).

    Returns, on rank 0, {"step", "engine_versions"} (each engine's final weight_version); else {}.
    Raises: ``DatasetError`` (file:line) for a bad train/eval row before any model is built;
    what ``rl_step`` raises (e.g. ``RewardFailureError`` above the verifier failure rate,
    ``EngineResponseError`` for an engine that returns fewer logprobs than tokens).
    """
    from megatron_rl.data.chat import build_prompt_ids, build_sft_sample, end_of_turn_id
    from megatron_rl.data.jsonl import check_prompt_lengths
    from megatron_rl.data.loader import RowKeys, load_rows
    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.rollout.client import SGLangClient
    from megatron_rl.rollout.multiturn import multiturn_service_fields
    from megatron_rl.rollout.supervisor import EngineSupervisor  # restarts dead engines at each sync
    from megatron_rl.rollout.weight_sync import WeightSync
    from megatron_rl.train import checkpointing as ckpt
    from megatron_rl.train.logging import MetricsLogger, WandbOptions, console, format_step_line
    from megatron_rl.train.rl_batch import PromptStream
    from megatron_rl.train.run_config import record_run_config
    from megatron_rl.train.sft import setup

    args, cfg = parse_args(argv)
    verifier = resolve_verifier(args.verifier) if verifier is None else verifier  # a bad flag fails first
    # data first: a bad row fails in seconds, naming file:line, before any model is built
    keys = RowKeys.from_args(args)
    datasets = {"": (args.train_data, load_rows(args.train_data, keys=keys,
                                                require_solution=cfg.hpt_gamma is not None))}
    for spec in args.eval_data:
        name, path = spec.split("=", 1)
        datasets[name] = (path, load_rows(path, keys=keys)[: cfg.eval_max_prompts])
    train_rows = [r for _, r in datasets[""][1]]
    eval_rows = {name: [r for _, r in lr] for name, (_, lr) in datasets.items() if name}
    wants_routes = cfg.routing_replay == "r3" or cfg.routing_flip_rate
    hook = None
    if cfg.routing_replay != "off" or cfg.routing_flip_rate:
        from megatron_rl.moe.routing_replay import enable_routing_replay as hook
    tr, tok, _ = setup(args, tconfig_hook=hook)
    if args.fp8_qat:
        from megatron_rl.quant.qat import apply_fp8_qat
        apply_fp8_qat(tr.model)
    rank0 = torch.distributed.get_rank() == 0
    ctx_len = engine_context_length(args.engine_extra_args) or tr.hf_config.get("max_position_embeddings", 1 << 30)
    for path, line_rows in datasets.values():  # a prompt that cannot fit fails here, naming file:line
        check_prompt_lengths(path, [ln for ln, _ in line_rows], [len(build_prompt_ids(tok, r)) for _, r in line_rows],
                             context_length=ctx_len, max_new_tokens=cfg.max_new_tokens)
    stream = PromptStream(train_rows, cfg.seed)
    evals = {name: ([build_prompt_ids(tok, r) for r in rows], [r["label"] for r in rows])
             for name, rows in eval_rows.items()}
    ref_model = load_reference_model(tr, cfg.ref_hf) if cfg.kl_coef > 0 else None
    # the engines report logprobs of softmax(logits / T): train on that same distribution
    apply_logits_temperature(tr, cfg.temperature)
    if ref_model is not None:
        apply_logits_temperature(ref_model, cfg.temperature)
    balance = None
    if tr.config.num_moe_experts:
        from megatron_rl.moe.balance import LoadBalance

        balance = LoadBalance(mode=cfg.lbl_mode, alpha=cfg.lbl_alpha, bias_update_rate=cfg.expert_bias_rate)
        balance.check(tr)  # refuse e.g. a frozen router with the LBL on, before any rollout
    root = args.save  # --save (default <out>/checkpoints); resumed from --load (default --save)
    record_run_config(args, is_rank0=rank0)  # <out>/config.yaml; warns on fields changed since --load's
    state = None if args.no_resume else ckpt.load_checkpoint(args.load, tr, fallback=args.resume_fallback)
    step = 0 if state is None else state["step"]
    log = MetricsLogger(args.out, enabled=rank0, resume_step=step, wandb=WandbOptions.from_args(args),
                        config=vars(args) | {"rl": vars(cfg)})
    eot = end_of_turn_id(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    max_len = max(len(build_prompt_ids(tok, r)) for r in train_rows) + cfg.max_new_tokens

    def demo(row: dict) -> Sample:  # HPT: the row's solution as one SFT row
        ids = build_sft_sample(tok, row, max_len + 64)
        first = ids["loss_mask"].index(1)
        return Sample(prompt_ids=ids["input_ids"][:first], output_ids=ids["input_ids"][first:],
                      rollout_logprobs=[0.0] * (len(ids["input_ids"]) - first), reward=1.0,
                      finish_reason="demo", weight_version=None, is_demo=True)

    result = {}
    with _engines(args) as launcher:
        svc = RolloutService(engine_urls=launcher.engine_urls if launcher else None,
                             router_url=launcher.router_url if launcher else None, tokenizer=tok,
                             verifier=verifier, stop_token_ids=() if eot is None else (eot,),
                             return_routed_experts=wants_routes,
                             routed_experts_layout=_route_layout(tr.config) if wants_routes else None,
                             **multiturn_service_fields(args, tok))
        weights = WeightSync(SGLangClient(launcher.engine_urls, drop_failed_engines=True) if launcher else None,
                             supervisor=EngineSupervisor(launcher) if launcher else None,
                             fp8_block=(128, 128) if args.rollout_fp8 == "block128" else None)
        weights.sync(tr.model, tr.hf_config, version=step)  # engines start from the (resumed) policy
        eval_temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
        eval_sampling = SamplingParams(temperature=eval_temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens, stop_token_ids=svc.stop_token_ids,
                                       seed=cfg.seed)

        def sampling(s: int) -> SamplingParams:
            return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                  stop_token_ids=svc.stop_token_ids, seed=(cfg.seed * 7919 + s) * cfg.num_samples)

        producer = RolloutProducer(svc, stream, lambda row: build_prompt_ids(tok, row),
                                   prompts_per_step=cfg.rollout_batch_size, n=cfg.n_samples_per_prompt,
                                   sampling=sampling, dynamic_sampling=cfg.dynamic_sampling,
                                   max_rounds=cfg.dynamic_sampling_max_rounds,
                                   async_one_step_off=cfg.async_one_step_off, partial_rollout=cfg.partial_rollout,
                                   partial_extra=cfg.partial_rollout_extra_groups)
        if state is not None:
            producer.load_state_dict(state["rollout"])
        producer.recover = lambda: weights.sync(tr.model, tr.hf_config, version=weights.version)  # all engines died
        ctx = StepContext(weights=weights, producer=producer, pad_id=pad_id, ref_model=ref_model,
                          demo=demo if cfg.hpt_gamma is not None else None, balance=balance,
                          token_multiple=args.token_multiple)
        steps_here, t_loop = 0, time.perf_counter()
        try:
            if evals and step == 0:  # the "before" row of the eval table
                log.log(0, svc.evaluate(evals, cfg.eval_n_samples, eval_sampling))
            while step < cfg.num_steps:
                batch = producer.get(step + 1, last_step=cfg.num_steps)
                metrics = rl_step(tr, cfg, ctx, batch, step=step + 1)
                step += 1
                last = step == cfg.num_steps
                if evals and ((cfg.eval_interval and step % cfg.eval_interval == 0) or last):
                    metrics.update(svc.evaluate(evals, cfg.eval_n_samples, eval_sampling))
                log.log(step, metrics)
                steps_here += 1
                if rank0:  # one console line per step; ETA from this process's mean step time
                    eta = (time.perf_counter() - t_loop) / steps_here * (cfg.num_steps - step)
                    console(format_step_line(step, cfg.num_steps, metrics, eta_s=eta))
                if args.stop_after_steps and steps_here >= args.stop_after_steps and not last:
                    break  # "killed": no checkpoint beyond the last periodic one
                if (cfg.save_interval and step % cfg.save_interval == 0) or last:
                    ckpt.save_checkpoint(root, step, tr, {"rollout": producer.state_dict()}, config=args.run_config)
        finally:
            producer.close()
        if rank0:
            result = {"step": step, "engine_versions": weights.check_versions(step)}
    log.close()
    destroy_parallel()
    return result


if __name__ == "__main__":
    main()
