"""aiohttp app of the embedded engine: the SGLang HTTP API subset the rollout client and sglang-router use.

Endpoints (JSON field names are SGLang's; errors are HTTP 400 `{"error": {"message": str}}`):
    POST /generate                   GenerateReqInput subset -> {"text","output_ids","meta_info"} | list
    GET  /health, /health_generate   200 (the latter runs a 1-token generation)
    GET  /get_server_info (/server_info), /get_model_info (/model_info), /get_weight_version, /v1/models
    POST /flush_cache, /abort_request {"rid","abort_all"}, /pause_generation {"mode"}, /continue_generation
    POST /update_weights_from_disk {"model_path","weight_version"?,"abort_all_requests"?}
    POST /update_weights_from_tensor {"serialized_named_tensors","weight_version"?,"flush_cache"?,
                                      "abort_all_requests"?}  (payload format: see weights.py)
    POST /init_weights_update_group {"master_address","master_port","rank_offset","world_size",
                                     "group_name"?="weight_update_group","backend"?="nccl"}
         -> {"success","message"}; joins the trainer's group as rank `rank_offset` (CPU: "gloo")
    POST /update_weights_from_distributed {"names","dtypes","shapes","group_name"?,"flush_cache"?,
                                           "abort_all_requests"?,"weight_version"?,"load_format"?}
         -> {"success","message"}; receives each tensor by broadcast from group rank 0, in order
    POST /destroy_weights_update_group {"group_name"?} -> {"success","message"}
Not served: streaming, OpenAI chat/completions, input logprobs, LoRA, multimodal.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict, dataclass

import torch
from aiohttp import web

from .model_runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Request, Scheduler
from ..update_group import DEFAULT_GROUP_NAME, UpdateGroup, dtype_from_str, init_update_group
from .weights import decode_named_tensors

VERSION = "megatron_rl-embedded-0.1"


@dataclass(kw_only=True)
class EngineConfig:
    """CLI of `python -m megatron_rl.rollout.engine`."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "float32"
    max_running_requests: int = 8
    seed: int = 0
    context_length: int | None = None
    weight_version: str = "default"
    update_group_timeout_s: float = 120.0


def _bad(msg: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": msg}}, status=status)


def _per_item(value, n: int, name: str) -> list:
    """Broadcast a scalar/dict field of a batched request, or check a per-item list's length."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def parse_generate(body: dict, runner: ModelRunner) -> tuple[list[dict], bool]:
    """Validate a /generate body -> (one kwargs dict per sequence, batched?). Raises ValueError."""
    if body.get("stream"):
        raise ValueError("stream=True is not supported by the embedded engine")
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise ValueError("Either text or input_ids should be provided (exactly one).")
    if ids is None:
        batched = isinstance(text, list)
        seqs = [runner.tokenizer.encode(t) for t in (text if batched else [text])]
    else:
        batched = bool(ids) and isinstance(ids[0], list)
        seqs = ids if batched else [ids]
    n, vocab, ctx = len(seqs), runner.model.config.vocab_size, runner.context_length
    sp = body.get("sampling_params") or {}
    rids = body.get("rid") or [uuid.uuid4().hex for _ in range(n)]
    if isinstance(rids, str):
        rids = [rids] if n == 1 else [f"{rids}_{i}" for i in range(n)]
    items = []
    for seq, p, rid, lp, re_ in zip(seqs, _per_item(sp, n, "sampling_params"), _per_item(rids, n, "rid"),
                                    _per_item(body.get("return_logprob", False), n, "return_logprob"),
                                    _per_item(body.get("return_routed_experts", False), n, "return_routed_experts")):
        if not seq:
            raise ValueError("The input is empty (0 tokens).")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in seq):
            raise ValueError(f"input_ids must be ints in [0, {vocab})")
        if len(seq) >= ctx:
            raise ValueError(f"The input ({len(seq)} tokens) is longer than the model's context length ({ctx} tokens).")
        items.append(dict(rid=str(rid), input_ids=list(seq), params=SamplingParams.from_dict(p),
                          return_logprob=bool(lp), return_routed_experts=bool(re_)))
    return items, batched


class EngineServer:
    """Holds the runner + scheduler; `app()` builds the aiohttp application."""

    def __init__(self, cfg: EngineConfig, runner: ModelRunner | None = None):
        self.cfg = cfg
        self.runner = runner or ModelRunner(cfg.model_path, cfg.dtype, cfg.context_length)
        self.sched = Scheduler(self.runner, cfg.max_running_requests, cfg.seed, cfg.weight_version)
        self.update_groups: dict[str, UpdateGroup] = {}

    async def _run(self, items: list[dict]) -> list[dict]:
        loop = asyncio.get_running_loop()
        reqs = [Request(**it, future=loop.create_future(), loop=loop) for it in items]
        submitted = []
        try:
            for r in reqs:
                self.sched.submit(r)
                submitted.append(r)
            return list(await asyncio.gather(*(r.future for r in reqs)))
        except BaseException:  # client went away, or a duplicate rid: do not leave orphans running
            for r in submitted:
                self.sched.abort(r.rid)
            raise

    async def generate(self, request: web.Request) -> web.Response:
        try:
            items, batched = parse_generate(await request.json(), self.runner)
            outs = await self._run(items)
        except (ValueError, TypeError) as e:
            return _bad(str(e))
        return web.json_response(outs if batched else outs[0])

    async def health_generate(self, request: web.Request) -> web.Response:
        p = SamplingParams(max_new_tokens=1, temperature=0.0)
        await self._run([dict(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0], params=p)])
        return web.Response(status=200)

    def server_info(self) -> dict:
        r, s = self.runner, self.sched
        return {**asdict(self.cfg), "model_path": r.model_path, "tokenizer_path": self.cfg.model_path,
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
        body = await _json(request)
        self.sched.abort(body.get("rid"), bool(body.get("abort_all", False)))
        return web.Response(status=200)

    async def pause(self, request: web.Request) -> web.Response:
        try:
            self.sched.pause((await _json(request)).get("mode") or "abort")
        except ValueError as e:
            return _bad(str(e))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request: web.Request) -> web.Response:
        self.sched.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def _update(self, body: dict, fn, what: str) -> web.Response:
        if body.get("abort_all_requests"):
            self.sched.abort(abort_all=True, message="Abort by weight update")
        try:
            n = await self.sched.call(fn, needs_idle=True)
        except (KeyError, ValueError, OSError, TypeError, RuntimeError) as e:
            return web.json_response({"success": False, "message": f"Failed to update weights: {e}"}, status=400)
        if body.get("weight_version") is not None:
            self.sched.weight_version = str(body["weight_version"])
        return web.json_response({"success": True, "message": f"Succeeded to update model weights ({what}: {n}).",
                                  "num_paused_requests": 0})

    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if not body.get("model_path"):
            return _bad("model_path is required")
        return await self._update(body, lambda: self.runner.load(body["model_path"]) or body["model_path"], "path")

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        body = await _json(request)
        try:
            named = decode_named_tensors(body["serialized_named_tensors"])
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({"success": False, "message": f"bad serialized_named_tensors: {e}"}, status=400)
        return await self._update(body, lambda: self.runner.update_from_tensors(named), "tensors")

    # -- disaggregated (distributed) weight update: SGLang's weight-update group ------------------
    async def init_group(self, request: web.Request) -> web.Response:
        body = await _json(request)
        name = body.get("group_name") or DEFAULT_GROUP_NAME
        try:
            args = (str(body["master_address"]), int(body["master_port"]), int(body["rank_offset"]),
                    int(body["world_size"]), name, str(body.get("backend") or "nccl"))
        except (KeyError, ValueError, TypeError) as e:
            return _fail(f"bad init_weights_update_group request: {e!r}")
        if name in self.update_groups:
            return _fail(f"weight update group {name!r} already exists; destroy it first")
        loop = asyncio.get_running_loop()  # the rendezvous blocks: keep it off the event loop
        try:
            group = await loop.run_in_executor(
                None, lambda: init_update_group(*args, timeout_s=self.cfg.update_group_timeout_s))
        except Exception as e:  # noqa: BLE001 - DistStoreError, RuntimeError, ValueError
            return _fail(f"Failed to init weight update group {name!r}: {type(e).__name__}: {e}")
        self.update_groups[name] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json(request)
        group = self.update_groups.get(body.get("group_name") or DEFAULT_GROUP_NAME)
        if group is None:
            return _fail(f"no weight update group {body.get('group_name') or DEFAULT_GROUP_NAME!r}; "
                         "call /init_weights_update_group first")
        try:
            names, shapes = list(body["names"]), [tuple(map(int, s)) for s in body["shapes"]]
            dtypes = [dtype_from_str(str(d)) for d in body["dtypes"]]
            if not len(names) == len(shapes) == len(dtypes):
                raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
        except (KeyError, ValueError, TypeError) as e:
            return _fail(f"bad update_weights_from_distributed request: {e}")

        def receive_and_load() -> int:  # worker thread: receive every tensor first (never strand the sender)
            named = {}
            for n, dt, shp in zip(names, dtypes, shapes):
                buf = torch.empty(shp, dtype=dt, device=group.device)
                group.broadcast(buf, src=0)
                named[n] = buf.cpu()
            return self.runner.update_from_tensors(named)
        return await self._update(body, receive_and_load, "distributed tensors")

    async def destroy_group(self, request: web.Request) -> web.Response:
        name = (await _json(request)).get("group_name") or DEFAULT_GROUP_NAME
        group = self.update_groups.pop(name, None)
        if group is None:
            return _fail(f"no weight update group {name!r}")
        group.destroy()
        return web.json_response({"success": True, "message": f"Succeeded to destroy custom process group {name!r}."})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31)
        ok = lambda _r: web.Response(status=200)  # noqa: E731
        js = lambda f: (lambda _r: _as_json(f()))  # noqa: E731
        flushed = lambda _r: web.Response(text="Cache flushed.\n")  # noqa: E731 (no prefix cache here)
        version = lambda: {"weight_version": self.sched.weight_version}  # noqa: E731
        models = lambda: {"object": "list", "data": [{"id": self.cfg.model_path, "object": "model",  # noqa: E731
                          "owned_by": "sglang", "root": self.cfg.model_path,
                          "max_model_len": self.runner.context_length}]}
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", ok)
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
        # training. The CPU engine keeps its weights in host memory, so both are accepted no-ops.
        occupancy = lambda _r: _as_json({"success": True, "message": "no-op on the CPU engine"})  # noqa: E731
        for path in ("/release_memory_occupation", "/resume_memory_occupation"):
            app.router.add_post(path, occupancy)
        app.on_startup.append(lambda _a: _async(self.sched.start))
        app.on_cleanup.append(lambda _a: _async(self.sched.shutdown))
        app.on_cleanup.append(lambda _a: _async(lambda: [g.destroy() for g in self.update_groups.values()]))
        return app


def _fail(msg: str) -> web.Response:
    return web.json_response({"success": False, "message": msg}, status=400)


async def _as_json(obj) -> web.Response:
    return web.json_response(obj)


async def _async(fn) -> None:
    fn()


async def _json(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
