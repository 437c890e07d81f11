"""GRPO-family RL of a Megatron-Core MoE model with rollout engines (embedded / SGLang).

    python -m megatron_rl.train.grpo --hf MODEL_DIR --train-data prompts.jsonl \
        --eval-data id=eval.jsonl --out RUN --num-engines 2 --rollout-batch-size 8 \
        --n-samples-per-prompt 4 --max-new-tokens 64 --num-steps 100 --mini-batches-per-rollout 1

One process per trainer rank (``torchrun`` / ``srun``). Rank 0 starts the engines + router and is
the only rank that talks HTTP; rollouts and rewards are broadcast to every rank. The loop, top-down:
``RolloutProducer.get`` (prompts -> engines, n samples each -> rewards; dynamic sampling; one-step-off
async) -> ``rl_step``: reward shaping -> advantages -> which samples train (overlong filter, HPT
demonstrations) -> DP shard, padded or packed ``MicroBatch``es -> old logprobs (routing replay
R3/R2 or recorded routes + flip rate, router counts kept: ``moe.step_routing.MoERouting``; mismatch
metrics, TIS / IcePop / sequence mask) -> reference logprobs (KL on) -> k mini-batch updates of
``losses.rl_loss`` (load balancing per mini-batch) -> versioned weight sync -> metrics;
then periodic eval and checkpoint (model, optimizer, scheduler, RNG, data cursor, rollout buffer).
Left out: colocated engines releasing memory during training (the launcher has the calls; the
loop runs engines and trainer disaggregated), multi-step-off asynchrony, a
critic (GAE exists as a loss function only), virtual pipeline stages.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rl.losses.mismatch import mismatch_correction
from megatron_rl.losses.rl_loss import PolicyLossSettings
from megatron_rl.losses.shaping import shaped_group_advantages
from megatron_rl.moe.step_routing import MoERouting
from megatron_rl.quant.fp8_engine import rollout_model_path
from megatron_rl.rollout.client import SamplingParams
from megatron_rl.rollout.rewards import Verifier, resolve_verifier
from megatron_rl.rollout.weight_sync import WeightSync
from megatron_rl.train.engine import Trainer, train_step
from megatron_rl.train.logprobs import apply_logits_temperature, logprobs_of
from megatron_rl.train.rl_batch import LossStats, MicroBatch, Sample, local_counts, microbatches, policy_forward_step
from megatron_rl.train.grpo_args import engine_context_length, parse_args  # noqa: F401 - parse_args re-exported
from megatron_rl.train.rl_config import RLConfig
from megatron_rl.train.rl_rollout import RolloutProducer, RolloutService, StepBatch, rollout_stats


@dataclass(kw_only=True)
class StepContext:
    """What ``rl_step`` needs besides the config: the weight sync, the driver's rollout producer
    (drained before the sync), the pad id, the MoE routing of the step (replay, recorded routes,
    load balancing: ``moe.step_routing.MoERouting``; no-ops for a dense model), the token multiple
    every micro-batch row length is padded to (the FP8 recipe's GEMM alignment, 1 without FP8),
    the frozen reference model (KL on) and a row -> demonstration builder (HPT on)."""

    weights: WeightSync
    producer: RolloutProducer
    pad_id: int
    moe: MoERouting
    token_multiple: int = 1
    ref_model: torch.nn.Module | None = None
    demo: Callable[[dict], Sample] | None = None


def rl_step(tr: Trainer, cfg: RLConfig, ctx: StepContext, batch: StepBatch, *, step: int) -> dict:
    """One RL step (policy version step-1 -> step) on a produced rollout batch. Collective.

    Args: tr: the trainer; cfg: the run config; ctx: see ``StepContext``; batch: this step's scored
        rollout (``RolloutProducer.get``: prompts -> engines -> rewards, with dynamic sampling /
        one-step-off as configured); step: the new policy version, pushed to the engines.
    Returns: rollout/*, mismatch/*, train/*, moe/*, perf/* metrics (identical on every rank except
        the driver-only perf/*_time_s of the rollout).
    """
    t_step, n = time.perf_counter(), cfg.n_samples_per_prompt
    samples = batch.samples
    metrics = version_metrics(samples, step, cfg.mini_batches_per_rollout) | batch.metrics
    metrics |= rollout_stats(samples, n)
    # 1. rewards (+ DAPO soft overlong punishment) -> group-wise advantages [P, n]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, n)
    lengths = torch.tensor([len(s.output_ids) for s in samples]).view(-1, n)
    adv, carries, reward_metrics = shaped_group_advantages(
        rewards, lengths, cfg.advantage, max_len=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer,
        overlong_factor=cfg.overlong_penalty)
    metrics |= reward_metrics
    # 2. which samples carry loss: valid reward in a group of >= 2 valid, overlong filtering, HPT
    train, train_adv = select_training_samples(samples, adv.reshape(-1), batch.rows, cfg, ctx, metrics,
                                               carries=carries.reshape(-1).tolist())
    # 3. this DP rank's share -> k mini-batches of micro-batches (padded rows, or packed)
    minis = shard_minibatches(train, train_adv, cfg, ctx.pad_id, token_multiple=ctx.token_multiple,
                              route_layout=ctx.moe.route_layout)
    flat = [mb for mini in minis for mb in mini]
    # 4. old logprobs under the rollout policy (no grad; routes replayed or recorded, router
    #    counts kept) -> mismatch (TIS / IcePop / seq mask) -> reference logprobs when the KL is on
    t0 = time.perf_counter()
    with ctx.moe.old_logprob_pass(flat) as route:
        for mb in flat:
            mb.old_logprobs = logprobs_of(tr.model, mb, route(mb), cfg.loss_impl)
    metrics |= ctx.moe.metrics | apply_mismatch_correction(flat, cfg)
    if ctx.ref_model is not None:
        with ctx.moe.reference_pass(ctx.ref_model) as route:
            for mb in flat:
                mb.ref_logprobs = logprobs_of(ctx.ref_model, mb, route(mb), cfg.loss_impl)
    metrics["perf/logprob_time_s"] = time.perf_counter() - t0
    # 5. k optimizer steps, each a token-mean over its global mini-batch (routes replayed, LBL)
    t0, per_mini, settings = time.perf_counter(), [], loss_settings(cfg)
    for j, mini in enumerate(minis):
        num_tokens, num_seqs = global_counts(mini)
        stats = LossStats()
        fstep = policy_forward_step(settings, num_tokens, num_seqs, stats)
        with ctx.moe.train_pass(tr, mini, j, fstep, grad_divisor=num_tokens) as moe_pass:
            out = train_step(tr, mini, forward_step=moe_pass.forward_step)
        per_mini.append({k: out[k] for k in ("train/loss", "train/grad_norm", "train/lr")}
                        | stats.reduce() | moe_pass.metrics)
    metrics |= minibatch_means(per_mini)
    metrics["perf/train_time_s"] = time.perf_counter() - t0
    # 6. versioned weight sync Megatron -> engines (version = step), once the engines are idle
    ctx.producer.drain()
    sync = ctx.weights.sync(tr.model, tr.hf_config, version=step)
    metrics |= {k: v for k, v in sync.items() if k.startswith("rollout/") or k == "perf/sync_time_s"}
    # 7. throughput
    metrics["perf/step_time_s"] = dt = time.perf_counter() - t_step + metrics.get("perf/produce_time_s", 0.0)
    metrics["perf/tokens_per_s"] = sum(len(s.prompt_ids) + len(s.output_ids) for s in samples) / dt
    return metrics


def loss_settings(cfg: RLConfig) -> PolicyLossSettings:
    """The trained loss's scalars (``losses.rl_loss``) from the run config."""
    return PolicyLossSettings(eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.loss_agg,
                              max_response_len=cfg.max_new_tokens, entropy_coef=cfg.entropy_coef,
                              kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, loss_impl=cfg.loss_impl)


def minibatch_means(per_mini: list[dict]) -> dict:
    """Per-step train metrics from each mini-batch's (train_step + LossStats + moe) metrics: the
    mean over the k mini-batches, the last LR, and the first mini-batch's max |ratio - 1|
    (exactly 0 on-policy: the perfect-baseline check)."""
    k = len(per_mini)
    out = {"train/ratio_max_abs_dev_first_minibatch": per_mini[0]["ratio_max_abs_dev"],
           "train/lr": per_mini[-1]["train/lr"]}
    for key in per_mini[0]:
        if key not in ("ratio_max_abs_dev", "train/lr"):
            out[key] = sum(m[key] for m in per_mini) / k
    return out


def version_metrics(samples: list[Sample], step: int, k: int) -> dict:
    """train/policy_version_lag (optimizer steps between the sampling policy and the update, the
    mean over the k mini-batches) and rollout/weight_version_min/max of the samples."""
    versions = [int(s.weight_version) for s in samples if (s.weight_version or "").isdigit()]
    rl_lag = (step - 1 - min(versions)) if versions else 0  # RL steps the samples are behind
    out = {"train/policy_version_lag": rl_lag * k + (k - 1) / 2}
    if versions:
        out["rollout/weight_version_min"] = float(min(versions))
        out["rollout/weight_version_max"] = float(max(versions))
    return out


def select_training_samples(samples: list[Sample], adv: torch.Tensor, rows: list[dict], cfg: RLConfig,
                            ctx: StepContext, metrics: dict, *, carries: list[bool] | None = None,
                            ) -> tuple[list[Sample], torch.Tensor]:
    """Samples that enter the loss and their advantages [N'].

    Overlong filtering (DAPO sec. 3.4) drops truncated samples from the loss (their rewards still
    counted in the group baseline); HPT (``cfg.hpt_gamma``; arXiv 2509.04419 sec. 4, eq. 7-8)
    replaces the rollouts of each prompt whose pass rate (reward >= 1) is <= gamma by one
    demonstration row (SFT loss: ``losses.rl_loss``). Failed verifications (NaN reward) are masked
    in ``collate``; samples with ``carries[i]`` False (``group_advantages``: non-finite reward,
    or fewer than 2 finite rewards in the group) are dropped. Adds
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
                      token_multiple: int = 1, route_layout: tuple[int, int] | None = None,
                      ) -> list[list[MicroBatch]]:
    """This DP rank's k mini-batches of micro-batches.

    The sample list is padded with fully masked dummy samples to a multiple of dp * k, so every
    DP rank runs the same number of micro-batches (the EP all-to-alls span DP ranks); rank r
    takes the r-th contiguous share, mini-batch j the j-th slice of it. Every row length (padded
    or packed) is rounded up to ``token_multiple`` with masked pad tokens (FP8 recipes need the
    GEMM's token count aligned: ``quant.fp8_training.fp8_pad_multiple``). ``route_layout`` (L, K):
    when some sample carries the engine's routes, every micro-batch gets them as ``routes``.
    """
    from megatron.core import parallel_state as ps

    dp, dp_rank, k = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), cfg.mini_batches_per_rollout
    if not any(s.routed_experts is not None for s in samples):
        route_layout = None
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
        return [_even_microbatch_count(pack_microbatches(part, a, cap, pad_id, route_layout=route_layout))
                for part, a in parts]
    seq_len = max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
    seq_len = -(-seq_len // token_multiple) * token_multiple
    return [microbatches(part, a, cfg.micro_batch_size, seq_len, pad_id, route_layout=route_layout)
            for part, a in parts]


def _even_microbatch_count(mini: list[MicroBatch]) -> list[MicroBatch]:
    """Pad a packed mini-batch with fully masked micro-batches to the DP group's max count."""
    from megatron.core import parallel_state as ps

    c = torch.tensor([len(mini)], dtype=torch.int64)
    torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX, group=ps.get_data_parallel_group())
    while len(mini) < int(c):
        mini.append(mini[0].masked_copy())
    return mini


def dummy_sample(pad_id: int) -> Sample:
    """A sample with no response: a fully masked row (pads the batch to an even DP split)."""
    return Sample(prompt_ids=[pad_id], output_ids=[], rollout_logprobs=[], reward=0.0,
                  finish_reason="pad", weight_version=None)


def apply_mismatch_correction(mbs: list[MicroBatch], cfg: RLConfig) -> dict:
    """Rollout-vs-trainer mismatch (``losses.mismatch.mismatch_correction``) on micro-batches with
    ``old_logprobs``: ``is_weights`` with a TIS cap; IcePop / sequence masking shrink
    ``loss_mask``. Collective over DP.

    Returns mismatch/{logprob_abs_diff, k3_kl, masked_frac, tis_clip_frac (rho > cap),
    is_weight_abs_dev (mean |w - 1|, 0 without TIS)} token-weighted over the DP group.
    Demonstration rows (HPT, no engine logprobs) are excluded from the mismatch statistics.
    """
    from megatron.core import parallel_state as ps

    icepop = None if cfg.icepop_low is None else (cfg.icepop_low, cfg.icepop_high)
    seq = None if cfg.seq_mask_low is None else (cfg.seq_mask_low, cfg.seq_mask_high)
    acc = torch.zeros(6, dtype=torch.float64)  # tokens, |dlogp|, k3, masked, TIS-capped, |w - 1| sums
    for mb in mbs:
        rl_mask = mb.loss_mask.bool()
        if mb.sft_mask is not None:
            rl_mask = rl_mask & ~mb.sft_mask.bool()
        weights, keep, mm = mismatch_correction(mb.old_logprobs, mb.rollout_logprobs, rl_mask, tis_cap=cfg.tis_cap,
                                                icepop_bounds=icepop, seq_bounds=seq)
        n = float(rl_mask.sum())
        w_dev = 0.0 if weights is None else float(((weights.double() - 1).abs() * rl_mask).sum())
        acc += torch.tensor([n, float(mm["mismatch/abs_logp_diff"]) * n, float(mm["mismatch/k3_kl"]) * n,
                             float(mm["mismatch/masked_frac"]) * n, float(mm["mismatch/tis_clip_frac"]) * n,
                             w_dev], dtype=torch.float64)
        dropped = rl_mask & ~keep
        mb.loss_mask = (mb.loss_mask.bool() & ~dropped).float()
        if weights is not None:
            mb.is_weights = torch.where(rl_mask, weights, torch.ones_like(weights))
    torch.distributed.all_reduce(acc, group=ps.get_data_parallel_group())
    n = acc[0].clamp(min=1)
    return {"mismatch/logprob_abs_diff": float(acc[1] / n), "mismatch/k3_kl": float(acc[2] / n),
            "mismatch/masked_frac": float(acc[3] / n), "mismatch/tis_clip_frac": float(acc[4] / n),
            "mismatch/is_weight_abs_dev": float(acc[5] / n)}


def global_counts(mini: list[MicroBatch]) -> tuple[int, int]:
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


def build_policy(args, cfg: RLConfig) -> tuple[Trainer, object, int, torch.nn.Module | None]:
    """The trainer (``train.setup``; routing replay enabled when R3 / R2 / the flip rate need
    it; FP8 QAT with ``--fp8-qat``), its tokenizer, the row token multiple, and the frozen
    reference (KL on); both models' logits divided by the rollout temperature (the engines
    report logprobs of softmax(logits / T))."""
    from megatron_rl.train.setup import setup

    hook = None
    if cfg.routing_replay != "off" or cfg.routing_flip_rate:
        from megatron_rl.moe.routing_replay import enable_routing_replay as hook
    # the LR schedule runs over optimizer steps: k per RL step (grpo_args.parse_args)
    tr, tok, _, token_multiple = setup(args, train_steps=args.train_iters, tconfig_hook=hook)
    if args.fp8_qat:
        from megatron_rl.quant.qat import apply_fp8_qat
        apply_fp8_qat(tr.model)
    ref_model = load_reference_model(tr, cfg.ref_hf) if cfg.kl_coef > 0 else None
    apply_logits_temperature(tr, cfg.temperature)
    if ref_model is not None:
        apply_logits_temperature(ref_model, cfg.temperature)
    return tr, tok, token_multiple, ref_model


def moe_routing(tr: Trainer, cfg: RLConfig) -> MoERouting:
    """The step's ``MoERouting``: replay mode, engine routes (R3 / flip rate) and, for a MoE
    model, the ``LoadBalance`` of ``cfg`` (checked now: e.g. a frozen router with the LBL on is
    refused before any rollout)."""
    balance = None
    if tr.config.num_moe_experts:
        from megatron_rl.moe.balance import LoadBalance

        balance = LoadBalance(mode=cfg.lbl_mode, alpha=cfg.lbl_alpha, bias_update_rate=cfg.expert_bias_rate)
        balance.check(tr)
    return MoERouting(tr.model, tr.config, replay=cfg.routing_replay, balance=balance,
                      engine_routes=cfg.routing_replay == "r3" or cfg.routing_flip_rate)


def start_rollouts(args, cfg: RLConfig, tr: Trainer, tok, launcher, stream, verifier: Verifier, *,
                   step: int, state: dict | None, route_layout: tuple[int, int] | None,
                   ) -> tuple[RolloutService, WeightSync, RolloutProducer]:
    """The rollout side on every rank (HTTP on rank 0 only): the service (engines + router of
    ``launcher``, ``verifier``; the engines return routes of ``route_layout`` (L, K) when given),
    the weight sync (engines start from the (resumed) policy of ``step``; dead engines restarted
    at each sync) and the producer (restored from ``state``)."""
    from megatron_rl.data.chat import build_prompt_ids, end_of_turn_id
    from megatron_rl.rollout.client import SGLangClient
    from megatron_rl.rollout.multiturn import multiturn_service_fields
    from megatron_rl.rollout.supervisor import EngineSupervisor

    eot = end_of_turn_id(tok)
    svc = RolloutService(engine_urls=launcher.engine_urls if launcher else None,
                         router_url=launcher.router_url if launcher else None, tokenizer=tok,
                         verifier=verifier, stop_token_ids=() if eot is None else (eot,),
                         return_routed_experts=route_layout is not None, routed_experts_layout=route_layout,
                         **multiturn_service_fields(args, tok))
    weights = WeightSync(SGLangClient(launcher.engine_urls, drop_failed_engines=True) if launcher else None,
                         supervisor=EngineSupervisor(launcher) if launcher else None,
                         fp8_block=(128, 128) if args.rollout_fp8 == "block128" else None)
    weights.sync(tr.model, tr.hf_config, version=step)

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
    return svc, weights, producer


def demo_builder(tok, max_len: int) -> Callable[[dict], Sample]:
    """HPT: a prompt row -> its ``solution`` as one SFT demonstration sample (rows of at most
    ``max_len`` + 64 tokens)."""
    from megatron_rl.data.chat import build_sft_sample

    def demo(row: dict) -> Sample:
        ids = build_sft_sample(tok, row, max_len + 64)
        first = ids["loss_mask"].index(1)
        return Sample(prompt_ids=ids["input_ids"][:first], output_ids=ids["input_ids"][first:],
                      rollout_logprobs=[0.0] * (len(ids["input_ids"]) - first), reward=1.0,
                      finish_reason="demo", weight_version=None, is_demo=True)

    return demo


def load_datasets(args, cfg: RLConfig) -> dict[str, tuple[str, list[tuple[int, dict]]]]:
    """The train and eval rows, read and checked before any model is built: {"": (path, rows)} for
    ``--train-data`` and {name: (path, rows[:eval_max_prompts])} per ``--eval-data NAME=PATH``; rows
    are (line / row number, row) in our schema after the ``--input-key`` / ``--label-key`` /
    ``--solution-key`` mapping. Raises ``DatasetError`` naming the file and row."""
    from megatron_rl.data.loader import RowKeys, load_rows

    keys = RowKeys.from_args(args)
    datasets = {"": (args.train_data, load_rows(args.train_data, keys=keys,
                                                require_solution=cfg.hpt_gamma is not None))}
    for spec in args.eval_data:
        name, path = spec.split("=", 1)
        datasets[name] = (path, load_rows(path, keys=keys)[: cfg.eval_max_prompts])
    return datasets


def main(argv=None, *, verifier: Verifier | None = None) -> dict:
    """Run (or resume) a GRPO job; ``verifier(response, label) -> float`` scores the samples
    (None: the one ``--verifier`` names, ``rollout.rewards.resolve_verifier``).

    Returns, on rank 0, {"step", "engine_versions"} (each engine's final weight_version); else {}.
    Raises: ``DatasetError`` (file:line) for a bad train/eval row before any model is built;
    what ``rl_step`` raises (e.g. ``RewardFailureError`` above the verifier failure rate,
    ``EngineResponseError`` for an engine that returns fewer logprobs than tokens).
    """
    from megatron_rl.data.chat import build_prompt_ids
    from megatron_rl.data.jsonl import check_prompt_lengths
    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.train import checkpointing as ckpt
    from megatron_rl.train.logging import MetricsLogger, WandbOptions, console, format_step_line
    from megatron_rl.train.rl_batch import PromptStream
    from megatron_rl.train.run_config import record_run_config

    args, cfg = parse_args(argv)
    verifier = resolve_verifier(args.verifier) if verifier is None else verifier  # a bad flag fails first
    datasets = load_datasets(args, cfg)  # a bad row fails in seconds, naming file:line, before any model
    train_rows = [r for _, r in datasets[""][1]]
    eval_rows = {name: [r for _, r in lr] for name, (_, lr) in datasets.items() if name}
    tr, tok, token_multiple, ref_model = build_policy(args, cfg)
    rank0 = torch.distributed.get_rank() == 0
    ctx_len = engine_context_length(args.engine_extra_args) or tr.hf_config.get("max_position_embeddings", 1 << 30)
    for path, line_rows in datasets.values():  # a prompt that cannot fit fails here, naming file:line
        check_prompt_lengths(path, [ln for ln, _ in line_rows], [len(build_prompt_ids(tok, r)) for _, r in line_rows],
                             context_length=ctx_len, max_new_tokens=cfg.max_new_tokens)
    stream = PromptStream(train_rows, cfg.seed)
    evals = {name: ([build_prompt_ids(tok, r) for r in rows], [r["label"] for r in rows])
             for name, rows in eval_rows.items()}
    moe = moe_routing(tr, cfg)
    root = args.save  # --save (default <out>/checkpoints); resumed from --load (default --save)
    record_run_config(args, is_rank0=rank0)  # <out>/config.yaml; warns on fields changed since --load's
    state = None if args.no_resume else ckpt.load_checkpoint(args.load, tr, fallback=args.resume_fallback)
    step = 0 if state is None else state["step"]
    log = MetricsLogger(args.out, enabled=rank0, resume_step=step, wandb=WandbOptions.from_args(args),
                        config=vars(args) | {"rl": vars(cfg)})
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    max_len = max(len(build_prompt_ids(tok, r)) for r in train_rows) + cfg.max_new_tokens
    result = {}
    with _engines(args) as launcher:
        svc, weights, producer = start_rollouts(args, cfg, tr, tok, launcher, stream, verifier,
                                                step=step, state=state, route_layout=moe.route_layout)
        eval_temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
        eval_sampling = SamplingParams(temperature=eval_temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens, stop_token_ids=svc.stop_token_ids,
                                       seed=cfg.seed)
        ctx = StepContext(weights=weights, producer=producer, pad_id=pad_id, moe=moe, ref_model=ref_model,
                          demo=demo_builder(tok, max_len) if cfg.hpt_gamma is not None else None,
                          token_multiple=token_multiple)
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
