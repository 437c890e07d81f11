"""Weight-update endpoints of the embedded engine (mixed into `EngineServer`), SGLang's schemas.

    POST /update_weights_from_disk {"model_path","weight_version"?,"abort_all_requests"?}
         model_path: a LOCAL HF directory (config.json inside); hub ids are never downloaded
         (local_files_only). Every refusal of a path gives the same message, so a caller learns
         nothing about what exists on the engine's machine beyond "usable model directory or not".
    POST /update_weights_from_tensor {"serialized_named_tensors","weight_version"?,"flush_cache"?,
                                      "abort_all_requests"?}  (payload format: see weights.py)
    POST /init_weights_update_group {"master_address","master_port","rank_offset","world_size",
                                     "group_name"?="weight_update_group","backend"?="nccl"}
    POST /update_weights_from_distributed {"names","dtypes","shapes","group_name"?,"flush_cache"?,
                                           "abort_all_requests"?,"weight_version"?,"load_format"?}
    POST /destroy_weights_update_group {"group_name"?}
All answer {"success": bool, "message": str}; refusals are HTTP 400 and leave the served weights and
`weight_version` unchanged (a tensor update is checked in full -- names, shapes, float dtypes,
finite values -- before anything is written).
"""

from __future__ import annotations

import asyncio
import os

import torch
from aiohttp import web

from ..update_group import DEFAULT_GROUP_NAME, dtype_from_str, init_update_group
from .weights import decode_named_tensors

DISK_REFUSAL = "model_path must be a local HF model directory readable by the engine"


def fail(msg: str) -> web.Response:
    return web.json_response({"success": False, "message": msg}, status=400)


class WeightEndpoints:
    """Needs `self.sched`, `self.runner`, `self.cfg`, `self.update_groups` and `self.body(request)`."""

    async def _update(self, body: dict, fn, what: str) -> web.Response:
        version = body.get("weight_version")
        if version is not None and not isinstance(version, (str, int)):
            return fail("weight_version must be a string")
        if body.get("abort_all_requests"):
            self.sched.abort(abort_all=True, message="Abort by weight update")
        try:
            n = await self.sched.call(fn, needs_idle=True)
        except Exception as e:  # noqa: BLE001 - any refusal is the caller's: old weights keep serving
            return fail(f"Failed to update weights: {type(e).__name__}: {e}")
        if version is not None:
            self.sched.weight_version = str(version)
        return web.json_response({"success": True, "message": f"Succeeded to update model weights ({what}: {n}).",
                                  "num_paused_requests": 0})

    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            return fail("model_path (a string) is required")
        if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
            return fail(DISK_REFUSAL)

        def load() -> str:
            try:
                self.runner.load(path, local_only=True)
            except Exception as e:  # noqa: BLE001 - do not echo file names found (or not) in the tree
                raise RuntimeError(f"could not load the model in model_path ({type(e).__name__})") from None
            return path
        return await self._update(body, load, "path")

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        payload = body.get("serialized_named_tensors")
        if not isinstance(payload, (str, list)) or (isinstance(payload, list)
                                                    and not all(isinstance(p, str) for p in payload)):
            return fail("serialized_named_tensors must be a base64 string or a list of them")
        try:
            named = decode_named_tensors(payload)
        except (ValueError, TypeError) as e:
            return fail(f"bad serialized_named_tensors: {e}")
        return await self._update(body, lambda: self.runner.update_from_tensors(named), "tensors")

    # -- disaggregated (distributed) weight update: SGLang's weight-update group ------------------
    async def init_group(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("group_name") or DEFAULT_GROUP_NAME
        try:
            args = (str(body["master_address"]), int(body["master_port"]), int(body["rank_offset"]),
                    int(body["world_size"]), str(name), str(body.get("backend") or "nccl"))
        except (KeyError, ValueError, TypeError) as e:
            return fail(f"bad init_weights_update_group request: {e!r}")
        if name in self.update_groups:
            return fail(f"weight update group {name!r} already exists; destroy it first")
        loop = asyncio.get_running_loop()  # the rendezvous blocks: keep it off the event loop
        try:
            group = await loop.run_in_executor(
                None, lambda: init_update_group(*args, timeout_s=self.cfg.update_group_timeout_s))
        except Exception as e:  # noqa: BLE001 - DistStoreError, RuntimeError, ValueError
            return fail(f"Failed to init weight update group {name!r}: {type(e).__name__}: {e}")
        self.update_groups[name] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("group_name") or DEFAULT_GROUP_NAME
        group = self.update_groups.get(name) if isinstance(name, str) else None
        if group is None:
            return fail(f"no weight update group {name!r}; call /init_weights_update_group first")
        try:
            names, shapes = list(body["names"]), [tuple(map(int, s)) for s in body["shapes"]]
            dtypes = [dtype_from_str(str(d)) for d in body["dtypes"]]
            if not len(names) == len(shapes) == len(dtypes):
                raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
        except (KeyError, ValueError, TypeError) as e:
            return fail(f"bad update_weights_from_distributed request: {e}")

        def receive_and_load() -> int:  # worker thread: receive every tensor first (never strand the sender)
            named = {}
            for n, dt, shp in zip(names, dtypes, shapes):
                buf = torch.empty(shp, dtype=dt, device=group.device)
                group.broadcast(buf, src=0)
                named[n] = buf.cpu()
            return self.runner.update_from_tensors(named)
        return await self._update(body, receive_and_load, "distributed tensors")

    async def destroy_group(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("group_name") or DEFAULT_GROUP_NAME
        group = self.update_groups.pop(name, None) if isinstance(name, str) else None
        if group is None:
            return fail(f"no weight update group {name!r}")
        group.destroy()
        return web.json_response({"success": True, "message": f"Succeeded to destroy custom process group {name!r}."})
