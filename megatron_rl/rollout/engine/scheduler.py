"""Request scheduler of the embedded engine: one worker thread, round-robin decoding of up to
`max_running_requests` sequences (each with its own KV cache), abort / pause / weight-update commands.

Legend: P = prompt tokens, C = completion tokens, L = MoE layers, K = router top-k.

The aiohttp event loop never touches the model: it enqueues a `Request` (or a command) and awaits an
asyncio future that the worker thread resolves with `loop.call_soon_threadsafe`. Every loop iteration
the worker (1) runs queued commands, (2) admits waiting requests, (3) advances each running request by
one forward (prefill of the prompt, then one token per step). Not done: batched tensor compute across
sequences (each forward is batch 1, which keeps greedy outputs bit-equal to HF `generate`), prefix cache.

Commands marked `needs_idle` (weight updates) wait until no request is running or generation is paused,
and block admission meanwhile -- SGLang's model-update writer lock. Pause modes (SGLang's
`PauseGenerationReqInput.mode`): "abort" (default) aborts everything in flight; "in_place"/"retract"
freeze running requests. While paused, new requests wait until `/continue_generation`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .model_runner import ModelRunner
from .sampling import SamplingParams, find_stop_str, sample_token, token_logprob

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Request:
    """One sequence. `future` resolves to the SGLang response dict ({"text", "output_ids", "meta_info"})."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    return_routed_experts: bool = False
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    max_new_tokens: int = 0  # params.max_new_tokens clipped to the context
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routes: list[np.ndarray] = field(default_factory=list)  # each int32 [T, L, K]
    cache: Any = None
    generator: torch.Generator | None = None
    aborted: str | None = None  # abort message, set from the event loop thread
    created: float = field(default_factory=time.monotonic)


class Scheduler:
    """Owns the worker thread. `weight_version` is reported in every response's meta_info."""

    def __init__(self, runner: ModelRunner, max_running_requests: int = 8, seed: int = 0,
                 weight_version: str = "default"):
        self.runner, self.max_running, self.seed = runner, max_running_requests, seed
        self.weight_version = weight_version
        # SGLang's switch: report log_softmax(raw logits) instead of the temperature-scaled ones
        self.original_logprobs = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in (
            "1", "true", "yes")
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.commands: queue.Queue = queue.Queue()
        self._idle_cmds: list = []
        self.paused: str | None = None  # None or the pause mode
        self._mutex = threading.RLock()
        self._wake = threading.Event()
        self._stop = False
        self._n = 0
        self.thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)

    # -- event-loop side ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=10)

    def submit(self, req: Request) -> None:
        """Queue a request. Raises ValueError on a duplicate rid (SGLang rejects it too)."""
        with self._mutex:
            if req.rid in self.requests:
                raise ValueError(f"Duplicate request ID: {req.rid}")
            ctx = self.runner.context_length
            req.max_new_tokens = min(req.params.max_new_tokens, ctx - len(req.input_ids))
            seed = req.params.sampling_seed
            if seed is None:
                self._n += 1
                seed = self.seed * 1_000_003 + self._n
            req.generator = torch.Generator().manual_seed(int(seed))
            self.requests[req.rid] = req
            self.waiting.append(req)
        self._wake.set()

    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "Abort request") -> int:
        """Mark running/queued requests aborted (finished by the worker). Returns how many matched."""
        with self._mutex:
            hits = list(self.requests.values()) if abort_all else [self.requests[rid]] if rid in self.requests else []
            for r in hits:
                r.aborted = message
        self._wake.set()
        return len(hits)

    def pause(self, mode: str = "abort") -> None:
        if mode not in ("abort", "in_place", "retract"):
            raise ValueError(f"pause mode must be abort|in_place|retract, got {mode!r}")
        self.paused = mode
        if mode == "abort":
            self.abort(abort_all=True, message="Abort by pause_generation")

    def resume(self) -> None:
        self.paused = None
        self._wake.set()

    async def call(self, fn: Callable[[], Any], needs_idle: bool = False) -> Any:
        """Run `fn()` on the worker thread between steps; re-raises its exception here."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.commands.put((fn, fut, loop, needs_idle))
        self._wake.set()
        return await fut

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- worker side ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._run_commands()
            self._admit()
            frozen = self.paused in ("in_place", "retract")
            if self.running and not frozen:
                for req in list(self.running):
                    self._step(req)
            else:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _run_commands(self) -> None:
        while True:
            try:
                self._idle_cmds.append(self.commands.get_nowait())
            except queue.Empty:
                break
        keep = []
        for fn, fut, loop, needs_idle in self._idle_cmds:
            if needs_idle and self.running and self.paused is None:
                keep.append((fn, fut, loop, needs_idle))
                continue
            try:
                res, exc = fn(), None
            except Exception as e:  # delivered to the awaiting handler
                res, exc = None, e
            loop.call_soon_threadsafe(_resolve, fut, res, exc)
        self._idle_cmds = keep

    def _admit(self) -> None:
        with self._mutex:
            for req in [r for r in self.waiting if r.aborted]:
                self.waiting.remove(req)
                self._finish(req, {"type": "abort", "message": req.aborted})
            blocked = self.paused is not None or any(c[3] for c in self._idle_cmds)
            while self.waiting and not blocked and len(self.running) < self.max_running:
                self.running.append(self.waiting.popleft())

    def _step(self, req: Request) -> None:
        """One forward for `req`: prefill (first call) or feed its last token; then sample or finish."""
        try:
            if req.aborted:
                return self._finish(req, {"type": "abort", "message": req.aborted})
            if req.cache is None:
                req.cache, feed = self.runner.new_cache(), req.input_ids
            else:
                feed = req.output_ids[-1:]
            logits, routes = self.runner.forward(feed, req.cache)  # [V] float32, [T, L, K]
            if req.return_routed_experts and routes is not None:
                req.routes.append(routes)
            if len(req.output_ids) >= req.max_new_tokens:
                return self._finish(req, {"type": "length", "length": req.max_new_tokens})
            tok = sample_token(logits, req.params, req.generator)
            req.output_ids.append(tok)
            if req.return_logprob:
                req.logprobs.append(token_logprob(logits, tok, req.params, original=self.original_logprobs))
            reason = self._stop_reason(req, tok)
            if reason is not None:
                self._finish(req, reason)
        except Exception as e:
            log.exception("request %s failed", req.rid)
            self._finish(req, {"type": "abort", "message": f"engine error: {e!r}"})

    def _stop_reason(self, req: Request, tok: int) -> dict | None:
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.runner.eos_token_ids):
            return {"type": "stop", "matched": tok}
        if p.stop:
            hit = find_stop_str(self.runner.decode(req.output_ids, p.skip_special_tokens), p.stop)
            if hit is not None:
                return {"type": "stop", "matched": hit[1]}
        if len(req.output_ids) >= req.max_new_tokens:
            return {"type": "length", "length": req.max_new_tokens}
        return None

    def _finish(self, req: Request, reason: dict) -> None:
        if req in self.running:
            self.running.remove(req)
        with self._mutex:
            self.requests.pop(req.rid, None)
        req.cache = None
        out = build_response(req, reason, self.runner, self.weight_version)
        req.loop.call_soon_threadsafe(_resolve, req.future, out, None)


def build_response(req: Request, reason: dict, runner: ModelRunner, weight_version: str) -> dict:
    """SGLang's /generate response for one sequence (text excludes a matched stop, like SGLang)."""
    p, ids = req.params, req.output_ids
    text_ids = ids[:-1] if reason.get("type") == "stop" and isinstance(reason.get("matched"), int) \
        and not p.no_stop_trim else ids
    text = runner.decode(text_ids, p.skip_special_tokens)
    if isinstance(reason.get("matched"), str) and not p.no_stop_trim:
        text = text[: text.find(reason["matched"])]
    meta = {"id": req.rid, "finish_reason": reason, "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": weight_version,
            "e2e_latency": time.monotonic() - req.created}
    if req.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(req.logprobs, ids)]
    if req.return_routed_experts:
        n = len(req.input_ids) + len(ids) - 1
        shape = (0, runner.num_moe_layers, runner.top_k)
        arr = np.concatenate(req.routes, axis=0)[:n] if req.routes else np.zeros(shape, np.int32)
        meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(arr, np.int32).tobytes()).decode("ascii")
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def _resolve(fut: asyncio.Future, res: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)

