"""The trainer's side of the rollout engines: generate + score on rank 0, broadcast to every rank.

Legend: P prompts per step, n samples per prompt, N = P * n samples (group-major order).

Only global rank 0 (the "driver") talks HTTP: it owns the ``EngineLauncher`` (engines + router)
and the ``SGLangClient``s. ``RolloutProducer.get`` generates and scores on the driver, then
``broadcast_object_list`` hands the same ``list[Sample]`` to every trainer rank. Evaluation
(n samples per held-out prompt, unbiased pass@k) runs on the driver only; its metrics are only
logged there. ``WeightSync`` is built on every rank (its ``sync`` is collective) with a client only
on the driver.
``RolloutProducer`` builds each RL step's batch on the driver: prompts from the ``PromptStream``,
dynamic sampling (DAPO: drop zero-variance groups, draw more prompts), and the one-step-off
asynchronous mode (the next step's rollout runs in a driver thread while this step trains).
Partial rollouts (``--partial-rollout``): ``rollout.partial.produce_partial``; multi-turn samples
(``--env``): ``rollout.multiturn`` via ``RolloutService.env``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from megatron_rl.rollout.client import SamplingParams, SGLangClient
from megatron_rl.rollout.rewards import RewardRunner, Verifier
from megatron_rl.rollout.rollout import generate_groups
from megatron_rl.train.pass_at_k import mean_pass_at_k, pass_at_k_by_split
from megatron_rl.train.rl_batch import Sample


def broadcast_from_driver(obj):
    """Every rank returns rank 0's ``obj`` (pickled; ``broadcast_object_list``)."""
    box = [obj if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(kw_only=True)
class RolloutService:
    """engine_urls / router_url: the engines (driver only; None elsewhere). tokenizer decodes
    responses for the verifier; stop_token_ids end a response (end-of-turn)."""

    engine_urls: list[str] | None
    router_url: str | None
    tokenizer: object
    verifier: Verifier
    stop_token_ids: tuple[int, ...] = ()

    @property
    def is_driver(self) -> bool:
        return torch.distributed.get_rank() == 0

    return_routed_experts: bool = False  # R3: engines return routes (the router drops them)
    routed_experts_layout: tuple[int, int] | None = None  # (MoE layers, top_k) of the routes
    # multi-turn (rollout.multiturn): the environment rewards the samples instead of the verifier
    env: object = None  # rollout.env.Environment, or None (single-turn)
    multiturn: object = None  # rollout.multiturn.MultiTurnConfig (with env)
    renderer: object = None  # rollout.multiturn.ChatRenderer of ``tokenizer`` (with env)
    eval_without_env: bool = False  # also evaluate single-turn (eval/notool_<split>/pass@k)

    def _client(self) -> SGLangClient:
        # sglang-router 0.3.2 drops return_routed_experts: with routes, balance over the engines here
        router = None if self.return_routed_experts else self.router_url
        return SGLangClient(self.engine_urls, router_url=router, routed_experts_layout=self.routed_experts_layout)

    def _generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams, tag: str):
        from megatron_rl.train.logging import progress_bar

        bar = progress_bar(len(prompts) * n, tag, leave=False, unit="sample")  # None off a terminal

        async def go():
            async with self._client() as c:
                return await generate_groups(c, prompts, n, sampling, return_logprob=True, rid_prefix=tag,
                                             return_routed_experts=self.return_routed_experts,
                                             on_result=None if bar is None else bar.update)

        try:
            return asyncio.run(go())
        finally:
            if bar is not None:
                bar.close()

    def evaluate(self, splits: dict[str, tuple[list[list[int]], list[str]]], n: int,
                 sampling: SamplingParams) -> dict[str, float]:
        """``eval/<split>/pass@<k>`` (unbiased, k = powers of 2 up to n) on the driver; {} elsewhere.

        splits: name -> (prompt token ids, labels). A sample is correct when its reward is >= 1.
        """
        if not self.is_driver:
            return {}
        correct = {}
        for name, (prompts, labels) in splits.items():
            samples, _ = self.generate_and_score(prompts, labels, n, sampling, f"eval-{name}")
            correct[name] = [[s.reward >= 1.0 for s in samples[i * n:(i + 1) * n]] for i in range(len(prompts))]
        out = {f"eval/{k}": v for k, v in pass_at_k_by_split(correct).items()}
        if self.env is not None and self.eval_without_env:  # the same policy, single-turn, verifier-scored
            plain = dataclasses.replace(self, env=None, eval_without_env=False)
            out |= {k.replace("eval/", "eval/notool_", 1): v for k, v in plain.evaluate(splits, n, sampling).items()}
        return out

    def generate_and_score(self, prompts: list[list[int]], labels: list[str], n: int,
                           sampling: SamplingParams, tag: str) -> tuple[list[Sample], dict]:
        """n samples per prompt from the engines, each scored by the verifier.

        prompts: P prompt token-id lists; labels: P reference answers; tag: request-id prefix
        (shows in the engine logs). Returns the P * n samples, group-major (prompt i's samples
        at [i * n, (i + 1) * n)), with the engine's token logprobs (and routes when requested),
        and ``perf/rollout_time_s`` / ``perf/reward_time_s`` in seconds plus the verifier's own
        metrics (``reward/<name>``, means over the samples; ``RewardResult.extra``). Raises what
        the client or the reward runner raise (an engine short of logprobs, a verifier that fails).
        """
        if self.env is not None:
            from megatron_rl.rollout.multiturn import generate_and_score_episodes

            return generate_and_score_episodes(self, prompts, labels, n, sampling, tag)
        t0 = time.perf_counter()
        groups = self._generate(prompts, n, sampling, tag)
        t1 = time.perf_counter()
        flat = [r for g in groups for r in g]
        texts = [self.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in flat]
        scored = RewardRunner(self.verifier).score_sync(texts, [lab for lab in labels for _ in range(n)], n)
        samples = [Sample(prompt_ids=r.prompt_ids, output_ids=r.output_ids, rollout_logprobs=r.logprobs,
                          reward=float(x), finish_reason=r.finish_reason, weight_version=r.weight_version,
                          **({"routed_experts": r.routed_experts} if self.return_routed_experts else {}))
                   for r, x in zip(flat, scored.rewards)]
        return samples, scored.extra | {"perf/rollout_time_s": t1 - t0,
                                        "perf/reward_time_s": time.perf_counter() - t1}


def rollout_stats(samples: list[Sample], n: int) -> dict[str, float]:
    """rollout/{reward_mean, pass@1, response_len_mean, response_len_max, truncation_rate}.

    pass@1: unbiased per-prompt estimate (correct = reward >= 1) averaged over the P groups.
    """
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    lens = [len(s.output_ids) for s in samples]
    groups = [samples[i:i + n] for i in range(0, len(samples), n)]
    counts = [(n, sum(s.reward >= 1.0 for s in g)) for g in groups]
    from megatron_rl.rollout.multiturn import multiturn_stats

    return multiturn_stats(samples) | {"rollout/reward_mean": float(rewards.nanmean()),
            "rollout/pass@1": mean_pass_at_k(counts, [1])[1],
            "rollout/response_len_mean": sum(lens) / len(lens),
            "rollout/response_len_max": float(max(lens)),
            "rollout/truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples)}


def weighted_means(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Merge per-call metric means: ``parts`` = [(samples in the call, {name: mean})] -> {name:
    sample-weighted mean over the calls that report it}; NaN means are left out."""
    acc: dict[str, list[float]] = {}
    for count, means in parts:
        for k, v in means.items():
            a = acc.setdefault(k, [0.0, 0.0])
            if v == v:
                a[0], a[1] = a[0] + v * count, a[1] + count
    return {k: (s / c if c else float("nan")) for k, (s, c) in acc.items()}


@dataclass(kw_only=True)
class StepBatch:
    """One RL step's rollout batch, identical on every rank after ``RolloutProducer.get``.

    samples: N = P * n scored samples, group-major; rows: the P prompt rows (jsonl dicts, for
    HPT demonstrations); metrics: rollout/* of the production (dynamic sampling) and driver
    timings.
    """

    samples: list[Sample]
    rows: list[dict]
    metrics: dict = field(default_factory=dict)


def group_has_variance(group: list[Sample]) -> bool:
    """True when the group's (finite) rewards are not all equal: its GRPO advantages are not 0."""
    r = [s.reward for s in group if s.reward == s.reward]
    return len(r) >= 2 and max(r) > min(r)


class RolloutProducer:
    """Produce each step's ``StepBatch`` on the driver; see the module docstring.

    Args: svc: the ``RolloutService``; stream: the ``PromptStream`` (only the driver's copy
        advances, and with one-step-off only the producing thread touches it until ``drain``;
        ``state_dict`` drains first and broadcasts the driver's cursor); to_prompt: row -> prompt token ids;
        P / n: prompts per step and samples per prompt; sampling: ``step -> SamplingParams`` base
        (its seed is offset per dynamic-sampling round); dynamic_sampling / max_rounds: DAPO's
        filter; async_one_step_off: keep one batch in flight.
    """

    def __init__(self, svc: RolloutService, stream, to_prompt, *, prompts_per_step: int, n: int,
                 sampling, dynamic_sampling: bool = False, max_rounds: int = 1,
                 async_one_step_off: bool = False, partial_rollout: bool = False, partial_extra: int = 1):
        self.svc, self.stream, self.to_prompt = svc, stream, to_prompt
        self.p, self.n, self.sampling = prompts_per_step, n, sampling
        self.dynamic, self.max_rounds, self.async_ = dynamic_sampling, max_rounds, async_one_step_off
        self._pending: tuple[int, Future | StepBatch] | None = None
        self.partial, self.partial_extra = partial_rollout, partial_extra
        self.partial_buffer: list = []  # rollout.partial: (row, slots) groups left unfinished
        self._pool = ThreadPoolExecutor(max_workers=1) if (async_one_step_off and svc.is_driver) else None

    # -- driver ----------------------------------------------------------------------------------
    def _produce(self, step: int) -> StepBatch:
        """Generate + score (+ filter) the batch of ``step`` (driver only). On any error the
        prompt cursor is put back, so a retried step draws the same prompts."""
        cursor = self.stream.state_dict()
        try:
            return self._produce_once(step)
        except BaseException:
            self.stream.load_state_dict(cursor)
            raise

    def _produce_once(self, step: int) -> StepBatch:
        if self.partial:
            from megatron_rl.rollout.partial import produce_partial

            return produce_partial(self, step)
        t0 = time.perf_counter()
        kept: list[tuple[dict, list[Sample]]] = []
        dropped: list[tuple[dict, list[Sample]]] = []
        times = {"perf/rollout_time_s": 0.0, "perf/reward_time_s": 0.0}
        rounds, generated, extra = 0, 0, []
        while len(kept) < self.p and rounds < (self.max_rounds if self.dynamic else 1):
            rows = self.stream.take(self.p - len(kept))  # round 0: P; later rounds: what is missing
            base = self.sampling(step)
            sp = dataclasses.replace(base, seed=None if base.seed is None else base.seed + rounds * 1_000_003)
            samples, t = self._generate_and_score_rows(rows, sp, f"step{step}-r{rounds}")
            for k in times:
                times[k] += t[k]
            extra.append((len(samples), {k: v for k, v in t.items() if k.startswith("reward/")}))
            for i, row in enumerate(rows):
                g = samples[i * self.n:(i + 1) * self.n]
                (kept if (not self.dynamic or group_has_variance(g)) else dropped).append((row, g))
            rounds, generated = rounds + 1, generated + len(rows)
        short = self.p - len(kept)
        groups = kept[: self.p] + dropped[:max(short, 0)]
        metrics = dict(times) | weighted_means(extra)  # the verifier's reward/<name> over every round
        if self.dynamic:
            metrics.update({"rollout/dynamic_rounds": float(rounds),
                            "rollout/prompts_generated": float(generated),
                            "rollout/zero_std_frac": len(dropped) / max(generated, 1),
                            "rollout/filled_zero_std_groups": float(max(short, 0))})
        metrics["perf/produce_time_s"] = time.perf_counter() - t0
        return StepBatch(samples=[s for _, g in groups for s in g], rows=[r for r, _ in groups],
                         metrics=metrics)

    def _generate_and_score_rows(self, rows, sampling, tag):
        prompts = [self.to_prompt(r) for r in rows]
        return self.svc.generate_and_score(prompts, [r["label"] for r in rows], self.n, sampling, tag)

    # -- collective ------------------------------------------------------------------------------
    recover = None  # collective callable: restart dead engines + push the current weights (grpo sets it)
    max_recoveries = 3

    def get(self, step: int, *, last_step: int) -> StepBatch:
        """The batch of ``step`` on every rank (collective). With one-step-off, the batch was
        started during the previous step (from the policy one version older) and the batch of
        ``step + 1`` (if <= ``last_step``) is started here, before training.

        When every engine has died (``AllEnginesFailedError``), all ranks call ``recover`` (which
        restarts the engines and syncs the current weights, or raises naming them) and the step's
        rollout is produced again from the same prompts, up to ``max_recoveries`` times. Any
        error on the driver is raised on every rank (no rank is left waiting in a collective)."""
        from megatron_rl.rollout.client import AllEnginesFailedError

        for attempt in range(self.max_recoveries + 1):
            batch, err = None, None
            if self.svc.is_driver:
                try:
                    batch = self._take(step, last_step)
                except Exception as e:  # noqa: BLE001 - shared below, re-raised on every rank
                    err = e
            kind = broadcast_from_driver(None if err is None else (type(err).__name__, str(err)))
            if kind is None:
                return broadcast_from_driver(batch)
            if kind[0] != AllEnginesFailedError.__name__ or self.recover is None or attempt == self.max_recoveries:
                if err is not None:
                    raise err
                raise RuntimeError(f"rollout of step {step} failed on the driver: {kind[0]}: {kind[1]}")
            print(f"[rollout] step {step}: every engine failed ({kind[1][:300]}); restarting them", flush=True)
            self.recover()
        raise AssertionError("unreachable")

    def _take(self, step: int, last_step: int) -> StepBatch:
        """Driver: this step's batch (buffered or produced now); starts the next one (async)."""
        if self._pending is not None:
            pstep, pend = self._pending
            if pstep != step:
                raise RuntimeError(f"rollout buffer holds step {pstep}'s batch, step {step} asked")
            self._pending = None
            batch = pend.result() if isinstance(pend, Future) else pend
        else:
            batch = self._produce(step)
        if self.async_ and step + 1 <= last_step:
            # from here until drain() the thread owns the prompt stream: nothing else reads it
            self._pending = (step + 1, self._pool.submit(self._produce, step + 1))
        return batch

    def drain(self) -> None:
        """Wait until the engines are idle (the in-flight batch, if any, is complete): call before
        a weight sync or an evaluation. Driver only; a no-op elsewhere. An in-flight batch that
        failed is dropped (its prompts were put back): ``get`` produces it again."""
        if self._pending is not None and isinstance(self._pending[1], Future):
            try:
                self._pending = (self._pending[0], self._pending[1].result())
            except Exception as e:  # noqa: BLE001 - e.g. every engine died mid-rollout
                print(f"[rollout] in-flight batch of step {self._pending[0]} failed ({type(e).__name__}: "
                      f"{str(e)[:300]}); it will be produced again", flush=True)
                self._pending = None

    def state_dict(self) -> dict:
        """The data cursor and the rollout buffer (the in-flight batch, completed), JSON-able.
        Collective (the driver's state is broadcast)."""
        state = None
        if self.svc.is_driver:
            self.drain()
            buf = None
            if self._pending is not None:
                pstep, b = self._pending
                buf = {"step": pstep, "rows": b.rows, "metrics": b.metrics,
                       "samples": [dataclasses.asdict(s) for s in b.samples]}
            state = {"stream": self.stream.state_dict(), "buffer": buf}
            if self.partial:
                from megatron_rl.rollout.partial import buffer_state

                state["partial"] = buffer_state(self.partial_buffer)
        return _jsonable(broadcast_from_driver(state))

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        if self.partial and self.svc.is_driver:
            from megatron_rl.rollout.partial import load_buffer

            self.partial_buffer = load_buffer(state.get("partial") or [])
        buf = state.get("buffer")
        if buf is not None and self.svc.is_driver:
            samples = [Sample(**s) for s in buf["samples"]]
            self._pending = (buf["step"], StepBatch(samples=samples, rows=buf["rows"], metrics=buf["metrics"]))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _jsonable(obj):
    """numpy arrays (routes) -> nested lists, so the state fits the checkpoint's JSON."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj
