"""Request scheduler of the embedded engine: one worker thread, continuous batching over a padded batch.

Legend: B = running rows, N = newly admitted requests, P = prompt tokens, C = completion tokens, V = vocab.

The aiohttp event loop never touches the model: it enqueues a `Request` (or a command) and awaits an
asyncio future that the worker thread resolves with `loop.call_soon_threadsafe`. Every iteration the
worker (1) runs queued commands, (2) admits waiting requests up to `max_running_requests`, then runs
ONE forward: a batched prefill of the admitted prompts (which are then merged into the running batch)
or, when nothing was admitted, one batched decode step of every running row (`KVBatch`). Sampling is
batched with per-row parameters and generators (sampler.py). Finished rows leave the batch at once.

Failure isolation: an exception while sampling or answering one request fails that request only
(finish_reason abort with the error, HTTP 200 like SGLang's aborts); an exception in a batched forward
fails the rows of that forward; the worker never dies of a request. If it dies anyway, `alive` is
False (/health answers 503) and every pending request is failed.

Commands marked `needs_idle` (weight updates) wait until no request is running or generation is paused,
and block admission meanwhile -- SGLang's model-update writer lock. Pause modes (SGLang's
`PauseGenerationReqInput.mode`): "abort" (default) aborts everything in flight; "in_place"/"retract"
freeze running requests. While paused, new requests wait until `/continue_generation`.
"""

from __future__ import annotations

import asyncio
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

from .kv_batch import KVBatch
from .model_runner import ModelRunner
from .response import build_response, error_response
from .sampler import sample
from .sampling import SamplingParams, find_stop_str

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests waiting than `--max-queued-requests` (HTTP 503)."""


@dataclass(kw_only=True)
class Request:
    """One sequence. `future` resolves to the SGLang response dict ({"text", "output_ids", "meta_info"});
    with `on_update` set, the worker also calls it (on the event loop) with each partial response."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_update: Callable[[dict], None] | None = None
    max_new_tokens: int = 0  # params.max_new_tokens clipped to the context
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list] = field(default_factory=list)
    input_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    routes: list[np.ndarray] = field(default_factory=list)  # each int32 [T, L, K]
    generator: torch.Generator | None = None
    aborted: str | None = None  # abort message, set from the event loop thread
    created: float = field(default_factory=time.monotonic)


class Scheduler:
    """Owns the worker thread. `weight_version` is reported in every response's meta_info."""

    def __init__(self, runner: ModelRunner, max_running_requests: int = 64, seed: int = 0,
                 weight_version: str = "default", max_queued_requests: int = 4096):
        self.runner, self.max_running, self.seed = runner, max_running_requests, seed
        self.max_queued = max_queued_requests
        self.weight_version = weight_version
        # SGLang's switch: report log_softmax(raw logits) instead of the temperature-scaled ones
        self.original_logprobs = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in (
            "1", "true", "yes")
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # row i of self.kv
        self.kv: KVBatch | None = None
        self.requests: dict[str, Request] = {}
        self.commands: queue.Queue = queue.Queue()
        self._idle_cmds: list = []
        self.paused: str | None = None  # None or the pause mode
        self.dead: str | None = None
        self._mutex = threading.RLock()
        self._wake = threading.Event()
        self._stop = False
        self._n = 0
        self.thread = threading.Thread(target=self._main, name="engine-worker", daemon=True)

    # -- event-loop side ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.dead is None and not self._stop

    def submit(self, req: Request) -> None:
        """Queue a request. Raises ValueError on a duplicate rid (SGLang rejects it too), QueueFullError
        when `max_queued_requests` are already waiting, RuntimeError when the worker is not running."""
        with self._mutex:
            if not self.alive:
                raise RuntimeError(f"engine scheduler is not running ({self.dead or 'stopped'})")
            if req.rid in self.requests:
                raise ValueError(f"Duplicate request ID: {req.rid}")
            if len(self.waiting) >= self.max_queued:
                raise QueueFullError(f"queue full: {len(self.waiting)} requests waiting "
                                     f"(--max-queued-requests {self.max_queued})")
            req.max_new_tokens = min(req.params.max_new_tokens, self.runner.context_length - len(req.input_ids))
            seed = req.params.sampling_seed
            if seed is None:
                self._n += 1
                seed = (self.seed * 1_000_003 + self._n) % (2**63)
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
            raise ValueError(f"mode must be abort|in_place|retract, got {mode!r}")
        self.paused = mode
        if mode == "abort":
            self.abort(abort_all=True, message="Abort by pause_generation")

    def resume(self) -> None:
        self.paused = None
        self._wake.set()

    async def call(self, fn: Callable[[], Any], needs_idle: bool = False) -> Any:
        """Run `fn()` on the worker thread between steps; re-raises its exception here."""
        if not self.alive:
            raise RuntimeError(f"engine scheduler is not running ({self.dead or 'stopped'})")
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
    def _main(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug; report it on /health and fail what is pending
            log.exception("engine worker died")
            self.dead = f"worker died: {e!r}"
            with self._mutex:
                pending = list(self.requests.values())
            for r in pending:
                r.loop.call_soon_threadsafe(_resolve, r.future, error_response(r, self.dead, self.weight_version),
                                            None)

    def _loop(self) -> None:
        while not self._stop:
            self._run_commands()
            admitted = self._admit()
            frozen = self.paused in ("in_place", "retract")
            if admitted:
                self._prefill(admitted)
            elif self.running and not frozen:
                self._decode()
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

    def _admit(self) -> list[Request]:
        with self._mutex:
            for req in [r for r in self.waiting if r.aborted]:
                self.waiting.remove(req)
                self._finish(req, {"type": "abort", "message": req.aborted})
            blocked = self.paused is not None or any(c[3] for c in self._idle_cmds)
            admitted = []
            while self.waiting and not blocked and len(self.running) + len(admitted) < self.max_running:
                admitted.append(self.waiting.popleft())
        return admitted

    def _prefill(self, new: list[Request]) -> None:
        """One batched forward over the admitted prompts; sample their first tokens; merge the survivors."""
        # input logprobs of positions start..P-1 need the logits of positions start-1..P-1
        keep = max([len(r.input_ids) - max(self._start(r) - 1, 0) for r in new if r.return_logprob] + [1])
        try:
            kv, last, tails, routes = self.runner.prefill([r.input_ids for r in new], keep_last=keep)
        except Exception as e:  # noqa: BLE001 - fail this forward's requests, keep serving
            log.exception("prefill of %d requests failed", len(new))
            for r in new:
                self._fail(r, f"engine error in prefill: {e!r}")
            return
        for i, r in enumerate(new):
            try:
                if routes is not None and r.return_routed_experts:
                    r.routes.append(routes[i])
                if r.return_logprob:
                    self._input_logprobs(r, tails[i])
            except Exception as e:  # noqa: BLE001
                log.exception("request %s failed", r.rid)
                self._fail(r, f"engine error: {e!r}")
        rows = [i for i, r in enumerate(new) if self.requests.get(r.rid) is r]
        survivors = self._sample_rows([new[i] for i in rows], last[rows] if rows else last[:0])
        keep = [rows[j] for j in survivors]
        if not keep:
            return
        kv.keep(keep)
        if self.kv is None or not self.running:
            self.kv = kv
        else:
            self.kv.merge(kv)
        self.running.extend(new[i] for i in keep)

    def _decode(self) -> None:
        """Finish aborted rows, then one batched decode forward of every running row."""
        for r in [r for r in self.running if r.aborted]:
            self._finish(r, {"type": "abort", "message": r.aborted})
        self._compact()
        if not self.running:
            return
        rows = list(self.running)
        try:
            logits, routes = self.runner.decode(self.kv, [r.output_ids[-1] for r in rows])
        except Exception as e:  # noqa: BLE001
            log.exception("decode of %d rows failed", len(rows))
            for r in rows:
                self._fail(r, f"engine error in decode: {e!r}")
            self._compact()
            return
        for i, r in enumerate(rows):
            if routes is not None and r.return_routed_experts:
                r.routes.append(routes[i:i + 1])
        self._sample_rows(rows, logits)
        self._compact()

    def _compact(self) -> None:
        """Drop rows whose request finished (in any way) from `running` and the KV batch."""
        live = [i for i, r in enumerate(self.running) if self.requests.get(r.rid) is r]
        if len(live) == len(self.running):
            return
        self.running = [self.running[i] for i in live]
        if not live:
            self.kv = None
        else:
            self.kv.keep(live)

    def _sample_rows(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Sample one token for each row (logits [len(rows), V]); returns indices of rows still running."""
        active = [i for i, r in enumerate(rows) if len(r.output_ids) < r.max_new_tokens]
        for i, r in enumerate(rows):
            if i not in active:
                self._finish(r, {"type": "length", "length": r.max_new_tokens})
        if not active:
            return []
        sub = [rows[i] for i in active]
        eos = self.runner.eos_token_ids
        try:
            toks, lps = sample(logits[active], sub, eos, self.original_logprobs)
            chosen = lps.gather(1, torch.tensor(toks, device=lps.device).unsqueeze(1)).squeeze(1).tolist()
            results = [(t, chosen[j], lps[j]) for j, t in enumerate(toks)]
        except Exception:  # noqa: BLE001 - find the row(s) at fault one by one
            results = []
            for j, r in enumerate(sub):
                try:
                    t, lp = sample(logits[active[j]:active[j] + 1], [r], eos, self.original_logprobs)
                    results.append((t[0], float(lp[0, t[0]]), lp[0]))
                except Exception as e:  # noqa: BLE001
                    log.exception("sampling for %s failed", r.rid)
                    results.append(e)
        still = []
        for j, (i, r) in enumerate(zip(active, sub)):
            try:
                if isinstance(results[j], Exception):
                    raise results[j]
                if self._append(r, *results[j]):
                    still.append(i)
            except Exception as e:  # noqa: BLE001
                log.exception("request %s failed", r.rid)
                self._fail(r, f"engine error: {e!r}")
        return still

    def _append(self, r: Request, tok: int, logprob: float, lprow: torch.Tensor) -> bool:
        """Record token `tok` with its logprob (row: float32 [V]); finish if it stops. True while running."""
        r.output_ids.append(tok)
        if r.return_logprob:
            r.logprobs.append(logprob)
            if r.top_logprobs_num > 0:
                v, ix = torch.topk(lprow, min(r.top_logprobs_num, lprow.numel()))
                r.top_logprobs.append(list(zip(v.tolist(), ix.tolist())))
        reason = self._stop_reason(r, tok)
        if reason is not None:
            self._finish(r, reason)
            return False
        if r.on_update is not None:
            self._emit(r)
        return True

    @staticmethod
    def _start(r: Request) -> int:
        """First prompt position with an input logprob (SGLang: -1 means the last prompt token)."""
        return len(r.input_ids) - 1 if r.logprob_start_len < 0 else r.logprob_start_len

    def _input_logprobs(self, r: Request, tail: torch.Tensor) -> None:
        """SGLang's input_token_logprobs for prompt positions start..P-1 from float32 logits
        `tail` [T, V] of the prompt's last T positions (T >= P - start + 1, or all P): position j's
        logprob is log_softmax(logits[j-1])[x_j] (unscaled), position 0 has none."""
        n, start = len(r.input_ids), self._start(r)
        first = n - tail.shape[0]  # prompt position of tail[0]
        lp = torch.log_softmax(tail, dim=-1)
        for j in range(start, n):
            tok = r.input_ids[j]
            if j == 0:
                r.input_logprobs.append((None, tok))
                r.input_top_logprobs.append(None)
                continue
            row = lp[j - 1 - first]
            r.input_logprobs.append((float(row[tok]), tok))
            if r.top_logprobs_num > 0:
                v, ix = torch.topk(row, min(r.top_logprobs_num, row.numel()))
                r.input_top_logprobs.append(list(zip(v.tolist(), ix.tolist())))

    def _stop_reason(self, req: Request, tok: int) -> dict | None:
        p = req.params
        if len(req.output_ids) >= p.min_new_tokens:
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.runner.eos_token_ids):
                return {"type": "stop", "matched": tok}
            if p.stop:
                hit = find_stop_str(self.runner.decode_text(req.output_ids, p.skip_special_tokens), p.stop)
                if hit is not None:
                    return {"type": "stop", "matched": hit[1]}
        if len(req.output_ids) >= req.max_new_tokens:
            return {"type": "length", "length": req.max_new_tokens}
        return None

    def _emit(self, r: Request) -> None:
        try:
            part = build_response(r, {}, self.runner.decode_text, self._layout(), self.weight_version)
        except Exception:  # noqa: BLE001 - a streaming snapshot is best effort; the final answer is not
            log.exception("stream snapshot of %s failed", r.rid)
            return
        r.loop.call_soon_threadsafe(r.on_update, part)

    def _layout(self) -> tuple[int, int]:
        return self.runner.num_moe_layers, self.runner.top_k

    def _fail(self, req: Request, message: str) -> None:
        self._finish(req, {"type": "abort", "message": message, "status_code": 500})

    def _finish(self, req: Request, reason: dict) -> None:
        with self._mutex:
            if self.requests.get(req.rid) is req:
                self.requests.pop(req.rid)
        try:
            out = build_response(req, reason, self.runner.decode_text, self._layout(), self.weight_version)
        except Exception as e:  # noqa: BLE001 - never leave a client waiting
            log.exception("building the response of %s failed", req.rid)
            out = error_response(req, f"engine error while building the response: {e!r}", self.weight_version)
        req.loop.call_soon_threadsafe(_resolve, req.future, out, None)


def _resolve(fut: asyncio.Future, res: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)
