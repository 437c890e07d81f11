"""Partial rollouts (slime's partial rollout / APRIL, arXiv 2509.18521): stop waiting for the long tail.

Legend: P groups a step needs, E extra groups in flight, n samples per group.

Each step runs the groups left unfinished by the previous step first, then new ones, P + E groups
in all. As soon as P groups are complete (every sample finished by stop or length), every request
still running is aborted; the engine returns its partial output (finish_reason "abort", with the
tokens and logprobs generated so far), which is kept. The next step continues each unfinished
sample from prompt + its tokens so far, with ``max_new_tokens`` = the budget left, under the new
weights: earlier tokens keep the logprobs (and ``token_versions``) of the policy that produced
them, so the trainer's mismatch correction (TIS / IcePop against ``rollout_logprobs``) covers them.
A request whose abort arrives before the engine saw it simply completes: nothing is lost or
generated twice either way, since a slot's tokens only ever grow by what the engine returned.

Left out: multi-turn episodes (``--env``) with partial rollouts, dynamic sampling with partial
rollouts, and routed experts of continued samples (R3 needs one engine pass over the whole
sequence; refused by the config).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from megatron_rl.rollout.client import SamplingParams

CONTINUE_SEED_STRIDE = 7_777_777  # continuation c of a sample seeded s samples with s + c * stride


@dataclass(kw_only=True)
class Slot:
    """One sample in the making. output_ids / logprobs / token_versions: [T] so far (token_versions:
    the policy version that produced each token, -1 when the engine's version is not an integer);
    finish_reason: None while unfinished; pieces: how many engine calls produced it."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    weight_version: str | None = None
    pieces: int = 0


def _version(v: str | None) -> int:
    return int(v) if v is not None and str(v).isdigit() else -1


async def run_slots(client, groups: list[list[Slot]], need: int, sampling: SamplingParams, *,
                    rid_prefix: str) -> int:
    """Advance every unfinished slot of ``groups`` ([G][n]) until ``need`` groups are complete, then
    abort what still runs. Slot (g, j) is seeded ``sampling.seed + g * n + j`` plus
    ``pieces * CONTINUE_SEED_STRIDE`` and requested as f"{rid_prefix}-p{g}-s{j}".
    Mutates the slots in place; returns how many requests came back aborted. Raises the first
    request error after cancelling the others."""
    n = len(groups[0]) if groups else 0
    for g in groups:  # a slot cut exactly at the budget is complete ("length")
        for s in g:
            if s.finish_reason is None and len(s.output_ids) >= sampling.max_new_tokens:
                s.finish_reason = "length"
    done = asyncio.Event()
    complete = [all(s.finish_reason is not None for s in g) for g in groups]
    if sum(complete) >= need:
        return 0
    running: set[str] = set()
    aborted = 0

    async def one(g: int, j: int) -> None:
        nonlocal aborted
        s = groups[g][j]
        seed = None if sampling.seed is None else sampling.seed + g * n + j + s.pieces * CONTINUE_SEED_STRIDE
        sp = dataclasses.replace(sampling, max_new_tokens=sampling.max_new_tokens - len(s.output_ids), seed=seed)
        rid = f"{rid_prefix}-p{g}-s{j}"
        running.add(rid)
        try:
            r = await client.generate(s.prompt_ids + s.output_ids, sp, return_logprob=True, rid=rid)
        finally:
            running.discard(rid)
        s.output_ids += r.output_ids
        s.logprobs += r.logprobs
        s.token_versions += [_version(r.weight_version)] * len(r.output_ids)
        s.weight_version, s.pieces = r.weight_version, s.pieces + 1
        if r.finish_reason == "abort":
            aborted += 1
            return
        s.finish_reason = r.finish_reason
        if all(x.finish_reason is not None for x in groups[g]):
            complete[g] = True
            if sum(complete) >= need:
                done.set()

    tasks = [asyncio.ensure_future(one(g, j)) for g, grp in enumerate(groups) for j, s in enumerate(grp)
             if s.finish_reason is None and len(s.output_ids) < sampling.max_new_tokens]
    waiter = asyncio.ensure_future(done.wait())
    try:
        pending = set(tasks)
        while pending and not done.is_set():
            finished, pending = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(waiter)
            for t in finished:
                if t is not waiter and t.exception() is not None:
                    raise t.exception()
        if done.is_set():  # enough complete groups: stop the rest, keep what they generated
            await asyncio.gather(*(client.abort(rid) for rid in sorted(running)))
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        waiter.cancel()
    return aborted


def staleness(token_versions: list[list[int]], current: int) -> dict[str, float]:
    """rollout/token_staleness_mean / _max: policy versions between each response token's producer
    and ``current`` (the version the step trains from), over every token of the batch."""
    vals = [current - v for tv in token_versions for v in tv if v >= 0]
    if not vals:
        return {"rollout/token_staleness_mean": 0.0, "rollout/token_staleness_max": 0.0}
    return {"rollout/token_staleness_mean": sum(vals) / len(vals),
            "rollout/token_staleness_max": float(max(vals))}


def produce_partial(prod, step: int):
    """``RolloutProducer._produce`` with partial rollouts (driver only): continue the buffered
    groups, add new prompts up to P + E groups, stop at P complete groups, score those with the
    verifier; the rest (unfinished, or complete beyond P) stay in ``prod.partial_buffer``.
    Metrics: rollout/token_staleness_mean/max (vs policy version step - 1), rollout/aborted_requests,
    rollout/partial_groups_carried / partial_tokens_carried (left in the buffer), perf/rollout_time_s,
    perf/reward_time_s. Raises RuntimeError when fewer than P groups complete (engine-side aborts)."""
    import time

    from megatron_rl.rollout.rewards import RewardRunner
    from megatron_rl.train.rl_batch import Sample
    from megatron_rl.train.rl_rollout import StepBatch

    t0 = time.perf_counter()
    svc, buf = prod.svc, prod.partial_buffer
    rows = prod.stream.take(max(prod.p + prod.partial_extra - len(buf), 0))
    buf += [(row, [Slot(prompt_ids=list(prod.to_prompt(row))) for _ in range(prod.n)]) for row in rows]

    async def go():
        async with svc._client() as c:
            return await run_slots(c, [g for _, g in buf], prod.p, prod.sampling(step), rid_prefix=f"step{step}")

    aborted = asyncio.run(go())
    t1 = time.perf_counter()
    ready = [i for i, (_, g) in enumerate(buf) if all(s.finish_reason is not None for s in g)][: prod.p]
    if len(ready) < prod.p:  # only when the engines aborted requests themselves (errors)
        raise RuntimeError(f"step {step}: {len(ready)} of {prod.p} groups complete after the rollout; "
                           f"{aborted} requests came back aborted (see the engine logs)")
    taken = [buf[i] for i in ready]
    prod.partial_buffer = [b for i, b in enumerate(buf) if i not in set(ready)]
    slots = [s for _, g in taken for s in g]
    texts = [svc.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in slots]
    scored = RewardRunner(svc.verifier).score_sync(texts, [r["label"] for r, _ in taken for _ in range(prod.n)],
                                                   prod.n)
    samples = [Sample(prompt_ids=s.prompt_ids, output_ids=s.output_ids, rollout_logprobs=s.logprobs,
                      reward=float(x), finish_reason=s.finish_reason, weight_version=s.weight_version,
                      token_versions=s.token_versions) for s, x in zip(slots, scored.rewards)]
    metrics = staleness([s.token_versions for s in slots], step - 1) | scored.extra | {
        "rollout/aborted_requests": float(aborted), "rollout/partial_groups_carried": float(len(prod.partial_buffer)),
        "rollout/partial_tokens_carried": float(sum(len(s.output_ids) for _, g in prod.partial_buffer for s in g)),
        "perf/rollout_time_s": t1 - t0, "perf/reward_time_s": time.perf_counter() - t1}
    metrics["perf/produce_time_s"] = time.perf_counter() - t0
    return StepBatch(samples=samples, rows=[r for r, _ in taken], metrics=metrics)


def buffer_state(buf) -> list[dict]:
    """The partial buffer as JSON-able rows (checkpoint)."""
    return [{"row": row, "slots": [dataclasses.asdict(s) for s in g]} for row, g in buf]


def load_buffer(state: list[dict]) -> list:
    return [(b["row"], [Slot(**s) for s in b["slots"]]) for b in state]
