"""aiohttp app of the embedded engine: the SGLang HTTP API subset the rollout client and sglang-router use.

Endpoints (JSON field names are SGLang's; errors are HTTP 400 `{"error": {"message": str}}` naming the
field; 401 without the `--api-key`; 503 when the queue is full or the scheduler is not running):
    POST /generate                   GenerateReqInput (io_struct.py) -> {"text","output_ids","meta_info"}
                                     | list; "stream": true -> server-sent events (`data: {...}` with the
                                     cumulative response so far, then `data: [DONE]`), as SGLang emits
    POST /v1/completions, /v1/chat/completions   OpenAI-compatible (openai_api.py)
    GET  /health                     200 while the scheduler thread runs, else 503 (no key needed)
    GET  /health_generate            runs a 1-token generation
    GET  /get_server_info (/server_info), /get_model_info (/model_info), /get_weight_version, /v1/models
    POST /flush_cache, /abort_request {"rid"|"abort_all"}, /pause_generation {"mode"}, /continue_generation
    POST weight updates: see weight_api.py
    POST /release_memory_occupation, /resume_memory_occupation: accepted no-ops
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from dataclasses import asdict, dataclass

from aiohttp import web

from .io_struct import parse_generate
from .model_runner import ModelRunner
from .sampling import ParamError, SamplingParams
from .scheduler import QueueFullError, Request, Scheduler
from .weight_api import WeightEndpoints

VERSION = "megatron_rl-embedded-0.2"
log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EngineConfig:
    """CLI of `python -m megatron_rl.rollout.engine` (SGLang's flag names)."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "float32"
    device: str = "cpu"
    max_running_requests: int = 64
    max_queued_requests: int = 4096
    seed: int = 0
    context_length: int | None = None
    weight_version: str = "default"
    update_group_timeout_s: float = 120.0
    api_key: str | None = None


def bad(msg: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": msg}}, status=status)


class EngineServer(WeightEndpoints):
    """Holds the runner + scheduler; `app()` builds the aiohttp application."""

    def __init__(self, cfg: EngineConfig, runner: ModelRunner | None = None):
        self.cfg = cfg
        self.runner = runner or ModelRunner(cfg.model_path, cfg.dtype, cfg.context_length, cfg.device)
        self.sched = Scheduler(self.runner, cfg.max_running_requests, cfg.seed, cfg.weight_version,
                               cfg.max_queued_requests)
        self.update_groups: dict = {}

    async def body(self, request: web.Request) -> dict | web.Response:
        """The JSON object body ({} when empty), or a 400 response saying why it is not one."""
        if not request.can_read_body:
            return {}
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            return bad(f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return bad(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def submit_all(self, items: list[dict], on_update=None) -> list[Request]:
        """Create and queue one Request per item; on any refusal, abort those already queued."""
        loop = asyncio.get_running_loop()
        reqs = [Request(**it, future=loop.create_future(), loop=loop, on_update=on_update) for it in items]
        submitted = []
        try:
            for r in reqs:
                self.sched.submit(r)
                submitted.append(r)
        except BaseException:
            for r in submitted:
                self.sched.abort(r.rid)
            raise
        return reqs

    async def run(self, items: list[dict]) -> list[dict]:
        reqs = self.submit_all(items)
        try:
            return list(await asyncio.gather(*(r.future for r in reqs)))
        except BaseException:  # client went away: do not leave orphans running
            for r in reqs:
                self.sched.abort(r.rid)
            raise

    def parse(self, body: dict) -> tuple[list[dict], bool]:
        r = self.runner
        return parse_generate(body, r.tokenizer, r.vocab_size, r.context_length)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        try:
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ParamError(f"stream must be a boolean, got {stream!r}")
            items, batched = self.parse(body)
            if stream:
                return await self.generate_stream(request, items)
            outs = await self.run(items)
        except (ParamError, ValueError) as e:
            return bad(str(e))
        except QueueFullError as e:
            return bad(str(e), 503)
        except RuntimeError as e:
            return bad(str(e), 503)
        return web.json_response(outs if batched else outs[0])

    async def generate_stream(self, request: web.Request, items: list[dict]) -> web.StreamResponse:
        """SSE: one `data: {json}` event per new token of any sequence (cumulative text / output_ids,
        "index" = the sequence's position), a final event per sequence, then `data: [DONE]`."""
        events: asyncio.Queue = asyncio.Queue()
        index = {it["rid"]: i for i, it in enumerate(items)}

        def on_update(part: dict) -> None:
            events.put_nowait(part)
        reqs = self.submit_all(items, on_update=on_update)
        for r in reqs:
            r.future.add_done_callback(lambda f: events.put_nowait(
                None if f.cancelled() or f.exception() else f.result()))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            pending = len(reqs)
            while pending:
                part = await events.get()
                if part is None:
                    pending -= 1
                    continue
                part["index"] = index.get(part["meta_info"]["id"], 0)
                if part["meta_info"]["finish_reason"] is not None:
                    pending -= 1
                await resp.write(f"data: {json.dumps(part)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except BaseException:
            for r in reqs:
                self.sched.abort(r.rid)
            raise
        return resp

    async def health(self, _request: web.Request) -> web.Response:
        if not self.sched.alive:
            return bad(f"scheduler is not running ({self.sched.dead or 'stopped'})", 503)
        return web.Response(status=200)

    async def health_generate(self, _request: web.Request) -> web.Response:
        p = SamplingParams(max_new_tokens=1, temperature=0.0)
        try:
            out = await self.run([dict(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0], params=p)])
        except (RuntimeError, ValueError) as e:
            return bad(str(e), 503)
        ok = out[0]["meta_info"]["finish_reason"].get("type") != "abort"
        return web.Response(status=200 if ok else 503)

    def server_info(self) -> dict:
        r, s = self.runner, self.sched
        cfg = {k: v for k, v in asdict(self.cfg).items() if k != "api_key"}
        return {**cfg, "model_path": r.model_path, "tokenizer_path": self.cfg.model_path,
                "served_model_name": self.cfg.model_path, "weight_version": s.weight_version,
                "context_length": r.context_length, "max_total_num_tokens": r.context_length * s.max_running,
                "num_moe_layers": r.num_moe_layers, "moe_router_topk": r.top_k, "version": VERSION,
                "engine": "embedded", "tp_size": 1, "dp_size": 1,
                "internal_states": [{"num_running_reqs": s.num_running, "num_waiting_reqs": s.num_waiting,
                                     "paused": s.paused}]}

    def model_info(self) -> dict:
        cfg = self.runner.model.config
        return {"model_path": self.runner.model_path, "tokenizer_path": self.cfg.model_path,
                "is_generation": True, "preferred_sampling_params": None,
                "weight_version": self.sched.weight_version, "model_type": cfg.model_type,
                "architectures": list(getattr(cfg, "architectures", None) or [])}

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if rid is not None and not isinstance(rid, str):
            return bad(f"rid must be a string, got {type(rid).__name__}")
        if not isinstance(abort_all, bool):
            return bad(f"abort_all must be a boolean, got {abort_all!r}")
        self.sched.abort(rid, abort_all)
        return web.Response(status=200)

    async def pause(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        try:
            self.sched.pause(body.get("mode") or "abort")
        except ValueError as e:
            return bad(str(e))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, _request: web.Request) -> web.Response:
        self.sched.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    @web.middleware
    async def guard(self, request: web.Request, handler):
        """--api-key (SGLang's: `Authorization: Bearer KEY`) on every endpoint but GET /health; and any
        unexpected exception of a handler becomes a 400/500 JSON error instead of a dropped connection."""
        key = self.cfg.api_key
        if key and request.path != "/health":
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
                return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ParamError as e:
            return bad(str(e))
        except Exception as e:  # noqa: BLE001 - a bug; logged, reported, the server keeps serving
            log.exception("%s %s failed", request.method, request.path)
            return bad(f"internal error: {type(e).__name__}", 500)

    def app(self) -> web.Application:
        from .openai_api import add_openai_routes

        app = web.Application(client_max_size=1 << 31, middlewares=[self.guard])
        js = lambda f: (lambda _r: _as_json(f()))  # noqa: E731
        flushed = lambda _r: _text("Cache flushed.\n")  # noqa: E731 (no prefix cache here)
        version = lambda: {"weight_version": self.sched.weight_version}  # noqa: E731
        models = lambda: {"object": "list", "data": [{"id": self.cfg.model_path, "object": "model",  # noqa: E731
                          "owned_by": "sglang", "root": self.cfg.model_path,
                          "max_model_len": self.runner.context_length}]}
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health_generate)
        for path in ("/get_server_info", "/server_info"):
            app.router.add_get(path, js(self.server_info))
        for path in ("/get_model_info", "/model_info"):
            app.router.add_get(path, js(self.model_info))
        app.router.add_get("/get_weight_version", js(version))
        app.router.add_get("/v1/models", js(models))
        app.router.add_route("*", "/flush_cache", flushed)
        app.router.add_post("/abort_request", self.abort_request)
        app.router.add_post("/pause_generation", self.pause)
        app.router.add_post("/continue_generation", self.resume)
        app.router.add_post("/update_weights_from_disk", self.update_from_disk)
        app.router.add_post("/update_weights_from_tensor", self.update_from_tensor)
        app.router.add_post("/init_weights_update_group", self.init_group)
        app.router.add_post("/update_weights_from_distributed", self.update_from_distributed)
        app.router.add_post("/destroy_weights_update_group", self.destroy_group)
        # Colocated mode: SGLang frees / re-takes its GPU memory (KV cache, weights) around
        # training. The embedded engine keeps its weights resident, so both are accepted no-ops.
        occupancy = lambda _r: _as_json({"success": True, "message": "no-op on the embedded engine"})  # noqa: E731
        for path in ("/release_memory_occupation", "/resume_memory_occupation"):
            app.router.add_post(path, occupancy)
        add_openai_routes(app, self)
        app.on_startup.append(lambda _a: _async(self.sched.start))
        app.on_cleanup.append(lambda _a: _async(self.sched.shutdown))
        app.on_cleanup.append(lambda _a: _async(lambda: [g.destroy() for g in self.update_groups.values()]))
        return app


async def _as_json(obj) -> web.Response:
    return web.json_response(obj)


async def _text(text: str) -> web.Response:
    return web.Response(text=text)


async def _async(fn) -> None:
    fn()
