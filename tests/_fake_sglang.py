"""A minimal fake SGLang server (aiohttp) speaking the subset of SGLang's HTTP API our client uses.

Run: python tests/_fake_sglang.py --port P [--context-len N] [--token-delay-s S] [--bad-logprobs]

Generation is a deterministic toy, independent of megatron_rl: token t of a request is
    (sum(input_ids) * 31 + 7 * seed + shift + 13 * t) % (VOCAB - 3) + 3
where `seed` is sampling_seed (0 when absent) and `shift` is the sum of all tensors last pushed by
/update_weights_from_tensor (or len(path) for /update_weights_from_disk). Token 2 is EOS only when
listed in stop_token_ids. text = one letter per token, chr(ord('a') + tok % 26); a stop string ends
generation and is trimmed from text (SGLang's default). logprob of token tok = -((tok % 7) + 0.5) / 3.
routed_experts: int32 (seq_len - 1, LAYERS, TOP_K), entry [p, l, k] = (p + 3 * l + k) % 8.

Left out: batching, real sampling, tokenizer endpoints, streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import base64

import numpy as np
from aiohttp import web

VOCAB, LAYERS, TOP_K = 64, 2, 2


def toy_token(input_ids: list[int], seed: int, shift: int, t: int) -> int:
    return (sum(input_ids) * 31 + 7 * seed + shift + 13 * t) % (VOCAB - 3) + 3


def toy_logprob(tok: int) -> float:
    return -((tok % 7) + 0.5) / 3


def toy_routed_experts(n_positions: int) -> np.ndarray:
    p, l, k = np.meshgrid(np.arange(n_positions), np.arange(LAYERS), np.arange(TOP_K), indexing="ij")
    return ((p + 3 * l + k) % 8).astype(np.int32)


class FakeEngine:
    def __init__(self, context_len: int, token_delay_s: float, bad_logprobs: bool):
        self.context_len, self.token_delay_s, self.bad_logprobs = context_len, token_delay_s, bad_logprobs
        self.shift, self.weight_version, self.paused = 0, "default", False
        self.aborted: set[str] = set()
        self.n_generate = self.inflight = self.max_inflight = 0

    async def generate(self, req: web.Request) -> web.Response:
        body = await req.json()
        ids, sp, rid = body["input_ids"], body.get("sampling_params", {}), body.get("rid")
        if len(ids) >= self.context_len:
            msg = f"The input ({len(ids)} tokens) is longer than the model's context length ({self.context_len} tokens)."
            return web.json_response({"error": {"message": msg}}, status=400)
        self.n_generate += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._generate(body, ids, sp, rid)
        finally:
            self.inflight -= 1

    async def _generate(self, body: dict, ids: list[int], sp: dict, rid) -> web.Response:
        while self.paused:
            await asyncio.sleep(0.01)
        max_new = min(sp.get("max_new_tokens", 16), self.context_len - len(ids))
        stops, stop_ids = sp.get("stop") or [], set(sp.get("stop_token_ids") or [])
        seed = sp.get("sampling_seed") or 0
        out, text, finish = [], "", {"type": "length", "length": max_new}
        for t in range(max_new):
            if rid in self.aborted:
                finish = {"type": "abort", "message": "Abort request"}
                break
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            tok = 2 if (t == 5 and 2 in stop_ids) else toy_token(ids, seed, self.shift, t)
            out.append(tok)
            if tok in stop_ids:
                finish = {"type": "stop", "matched": tok}
                break
            text += chr(ord("a") + tok % 26)
            hit = next((s for s in stops if s in text), None)
            if hit is not None:
                text = text[: text.index(hit)]
                finish = {"type": "stop", "matched": hit}
                break
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(out), "weight_version": self.weight_version}
        if body.get("return_logprob"):
            lps = [[toy_logprob(t), t, None] for t in out]
            meta["output_token_logprobs"] = lps[:-1] if self.bad_logprobs else lps
        if body.get("return_routed_experts"):
            arr = toy_routed_experts(len(ids) + len(out) - 1)
            meta["routed_experts"] = base64.b64encode(arr.tobytes()).decode()
        return web.json_response({"text": text, "output_ids": out, "meta_info": meta})

    async def update_from_tensor(self, req: web.Request) -> web.Response:
        from safetensors.torch import load
        body = await req.json()
        tensors = load(base64.b64decode(body["serialized_named_tensors"][0]))
        self.shift = int(sum(float(t.double().sum()) for t in tensors.values()))
        self.weight_version = body.get("weight_version") or self.weight_version
        return web.json_response({"success": True, "message": f"loaded {len(tensors)} tensors"})

    async def update_from_disk(self, req: web.Request) -> web.Response:
        body = await req.json()
        self.shift = len(body["model_path"])
        self.weight_version = body.get("weight_version") or self.weight_version
        return web.json_response({"success": True, "message": "ok"})

    async def abort(self, req: web.Request) -> web.Response:
        self.aborted.add((await req.json())["rid"])
        return web.json_response({})

    def app(self) -> web.Application:
        ok = lambda payload=None: (lambda _req: _ok(payload))  # noqa: E731
        app = web.Application(client_max_size=2**28)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/update_weights_from_tensor", self.update_from_tensor)
        app.router.add_post("/update_weights_from_disk", self.update_from_disk)
        app.router.add_post("/abort_request", self.abort)
        app.router.add_post("/pause_generation", lambda r: self._set_paused(True))
        app.router.add_post("/continue_generation", lambda r: self._set_paused(False))
        for path in ("/flush_cache", "/release_memory_occupation", "/resume_memory_occupation"):
            app.router.add_post(path, ok({"success": True}))
        app.router.add_get("/flush_cache", ok({"success": True}))
        app.router.add_get("/health", ok())
        app.router.add_get("/health_generate", ok())
        app.router.add_get("/get_model_info", ok({"model_path": "fake", "is_generation": True}))
        app.router.add_get("/get_server_info", lambda r: _ok({
            "context_length": self.context_len, "weight_version": self.weight_version,
            "n_generate": self.n_generate, "max_inflight": self.max_inflight, "engine": "fake"}))
        return app

    async def _set_paused(self, value: bool) -> web.Response:
        self.paused = value
        return web.json_response({"success": True})


async def _ok(payload=None) -> web.Response:
    return web.json_response(payload if payload is not None else {})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--context-len", type=int, default=64)
    p.add_argument("--token-delay-s", type=float, default=0.0)
    p.add_argument("--bad-logprobs", action="store_true")
    a = p.parse_args()
    web.run_app(FakeEngine(a.context_len, a.token_delay_s, a.bad_logprobs).app(),
                host=a.host, port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
