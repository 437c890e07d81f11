"""Async client for SGLang-compatible engines (real SGLang or our embedded engine): tokens in, tokens out.

Legend: L = prompt length, T = generated tokens, S = L + T (seq_len), layers/top_k = MoE routing layout.

`SGLangClient(urls, router_url=...)`: generation goes through the router when given (the router
balances and retries across its workers), else the client balances itself over `urls` and, when an
engine fails (connection error, timeout, HTTP 5xx), retries the request on a DIFFERENT engine and
marks the failed one dead (`client.dead_engines`). Control calls (weights, pause, flush, abort,
memory) always go to every engine in `urls` directly: the router forwards only generation.

Responses are validated; a malformed one raises `EngineResponseError` naming the request id
(e.g. fewer logprobs than output tokens) -- never padded with zeros. HTTP 4xx (e.g. a prompt longer
than the context) raises `EngineRequestError` with the engine's message, without retrying.

Weight payloads (`update_weights_from_tensor`): engine_kind="embedded" sends
base64(safetensors.torch.save(named_tensors)) in `serialized_named_tensors[0]`. Real SGLang expects
one MultiprocessingSerializer payload per TP rank (CUDA IPC handles, same node only) and is refused
here with NotImplementedError: for real SGLang, use `update_weights_from_disk` or a distributed
weight-update group (`init_weights_update_group` with engine i as rank i + 1, then per bucket
`update_weights_from_distributed` while the trainer broadcasts; driven by `WeightSync(mode=
"distributed")`). Left out: streaming, text prompts, the OpenAI API.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import aiohttp
import numpy as np

log = logging.getLogger(__name__)
EngineKind = Literal["embedded", "sglang"]


class EngineRequestError(RuntimeError):
    """The engine refused the request (HTTP 4xx): retrying elsewhere would not help."""


class EngineResponseError(RuntimeError):
    """The engine answered with a malformed response (missing or inconsistent fields)."""


class AllEnginesFailedError(RuntimeError):
    """A request failed on every engine it was tried on (retries exhausted or no engine left)."""


class _EngineFailure(Exception):
    """Internal: connection error / timeout / 5xx on one engine; the request may go elsewhere."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """SGLang sampling params. top_k=-1 means no top-k; seed=None means engine-chosen randomness."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                             "max_new_tokens": self.max_new_tokens}
        if self.stop:
            d["stop"] = list(self.stop)
        if self.stop_token_ids:
            d["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            d["sampling_seed"] = self.seed
        return d


@dataclass(kw_only=True)
class GenerateResult:
    """One sample. output_ids: [T] int; logprobs: [T] float (natural log, of the sampled token) or
    None when not requested; routed_experts: int32 [S - 1, layers, top_k] or None;
    finish_reason: "stop" | "length" | "abort"; engine_url: the engine (or router) that answered."""

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str
    weight_version: str | None
    routed_experts: np.ndarray | None = None
    finish_message: str | None = None
    engine_url: str = ""
    meta_info: dict[str, Any] = field(default_factory=dict, repr=False)


def parse_generate_response(body: dict[str, Any], *, rid: str, prompt_ids: Sequence[int],
                            return_logprob: bool,
                            routed_layout: tuple[int, int] | None) -> GenerateResult:
    """Validate one SGLang /generate response body and convert it.

    Raises EngineResponseError (naming `rid`) when output_ids/meta_info/finish_reason are missing,
    when the logprob count or token ids disagree with output_ids, when a logprob is not finite or
    > 1e-4, or when routed_experts does not hold (S - 1) * layers * top_k int32 values.
    """
    meta = body.get("meta_info")
    if not isinstance(meta, dict) or not isinstance(body.get("output_ids"), list):
        raise EngineResponseError(f"request {rid}: response lacks output_ids/meta_info: {str(body)[:200]}")
    out = [int(t) for t in body["output_ids"]]
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") not in ("stop", "length", "abort"):
        raise EngineResponseError(f"request {rid}: bad finish_reason {fr!r}")
    logprobs = None
    if return_logprob:
        entries = meta.get("output_token_logprobs")
        if entries is None or len(entries) != len(out):
            n = None if entries is None else len(entries)
            raise EngineResponseError(f"request {rid}: {n} logprobs for {len(out)} output tokens")
        logprobs = [float(e[0]) for e in entries]
        if [int(e[1]) for e in entries] != out:
            raise EngineResponseError(f"request {rid}: logprob token ids differ from output_ids")
        bad = [x for x in logprobs if not (math.isfinite(x) and x <= 1e-4)]
        if bad:
            raise EngineResponseError(f"request {rid}: invalid logprobs {bad[:4]}")
    routed = None
    if routed_layout is not None:
        routed = _decode_routed(meta.get("routed_experts"), rid, len(prompt_ids) + len(out) - 1, routed_layout)
    return GenerateResult(rid=rid, prompt_ids=list(prompt_ids), output_ids=out, text=body.get("text", ""),
                          logprobs=logprobs, finish_reason=fr["type"], finish_message=fr.get("message"),
                          weight_version=meta.get("weight_version"), routed_experts=routed, meta_info=meta)


def _decode_routed(b64: Any, rid: str, n_pos: int, layout: tuple[int, int]) -> np.ndarray:
    if not isinstance(b64, str):
        raise EngineResponseError(f"request {rid}: routed_experts requested but missing")
    arr = np.frombuffer(base64.b64decode(b64), dtype=np.int32)
    layers, top_k = layout
    if arr.size != n_pos * layers * top_k:
        raise EngineResponseError(f"request {rid}: routed_experts has {arr.size} values, expected "
                                  f"{n_pos}x{layers}x{top_k} (seq_len-1 x layers x top_k)")
    return arr.reshape(n_pos, layers, top_k).copy()


class SGLangClient:
    """Async client over engines `urls` (control + direct generation) and an optional `router_url`.

    max_concurrency: in-flight /generate requests (asyncio.Semaphore); timeout_s: per HTTP request;
    retries: extra attempts per request after an engine failure (each on another engine in direct
    mode); routed_experts_layout: (layers, top_k) used to reshape routed_experts.
    """

    def __init__(self, urls: Sequence[str] = (), *, router_url: str | None = None, max_concurrency: int = 64,
                 timeout_s: float = 600.0, retries: int = 2, engine_kind: EngineKind = "embedded",
                 routed_experts_layout: tuple[int, int] | None = None, drop_failed_engines: bool = False,
                 api_key: str | None = None):
        if not urls and not router_url:
            raise ValueError("SGLangClient needs engine urls and/or a router_url")
        self.urls = [u.rstrip("/") for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.max_concurrency, self.timeout_s, self.retries = max_concurrency, timeout_s, retries
        self.engine_kind, self.routed_experts_layout = engine_kind, routed_experts_layout
        self.drop_failed_engines = drop_failed_engines
        self.dead_engines: list[str] = []
        self.router_dead = False
        self.n_retried = 0
        # SGLang's --api-key (Authorization: Bearer KEY); default $MEGATRON_RL_API_KEY like LaunchConfig
        key = api_key if api_key is not None else os.environ.get("MEGATRON_RL_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._rr = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ plumbing
    def _ensure(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  connector=aiohttp.TCPConnector(limit=0), headers=self._headers)
            self._sem, self._loop = asyncio.Semaphore(self.max_concurrency), loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> "SGLangClient":
        self._ensure()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _request(self, method: str, url: str, payload: dict | None = None) -> Any:
        """One HTTP call. 4xx -> EngineRequestError; connection error / timeout / 5xx -> _EngineFailure."""
        session = self._ensure()
        try:
            async with session.request(method, url, json=payload) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise _EngineFailure(f"{url}: HTTP {resp.status}: {text[:300]}")
                if resp.status >= 400:
                    raise EngineRequestError(f"{url}: HTTP {resp.status}: {_error_message(text)}")
                try:
                    return await resp.json(content_type=None) if text.strip() else {}
                except ValueError:
                    return text
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
            raise _EngineFailure(f"{url}: {type(e).__name__}: {e}") from e

    def _live(self) -> list[str]:
        return [u for u in self.urls if u not in self.dead_engines]

    def _mark_dead(self, url: str, why: str) -> None:
        if url == self.router_url:
            if not self.router_dead:
                log.warning("router %s failed (%s): balancing over the engines directly", url, why)
            self.router_dead = True
        elif url not in self.dead_engines:
            log.warning("engine %s marked dead: %s", url, why)
            self.dead_engines.append(url)

    def mark_dead(self, url: str, why: str = "marked by the caller") -> None:
        """Leave engine ``url`` out of generation and control calls (e.g. its process exited)."""
        self._mark_dead(url, why)

    def revive(self, url: str) -> None:
        """Put a restarted engine back into generation and control calls."""
        if url in self.dead_engines:
            self.dead_engines.remove(url)

    # ------------------------------------------------------------ generation
    async def generate(self, input_ids: Sequence[int], sampling: SamplingParams, *, return_logprob: bool = True,
                       return_routed_experts: bool = False, rid: str) -> GenerateResult:
        """Generate from token ids. Returns a validated GenerateResult (see parse_generate_response).

        Raises EngineRequestError (4xx, e.g. prompt longer than the context), EngineResponseError
        (malformed response), AllEnginesFailedError (retries exhausted / no live engine left).
        """
        if return_routed_experts and self.routed_experts_layout is None:
            raise ValueError("return_routed_experts needs SGLangClient(routed_experts_layout=(layers, top_k))")
        payload = {"input_ids": list(map(int, input_ids)), "sampling_params": sampling.to_json(),
                   "return_logprob": return_logprob, "rid": rid}
        if return_routed_experts:
            payload["return_routed_experts"] = True
        self._ensure()
        errors: list[str] = []
        tried: set[str] = set()
        async with self._sem:
            for attempt in range(self.retries + 1):
                url = self._pick(tried)
                if url is None:
                    break
                tried.add(url)
                try:
                    body = await self._request("POST", f"{url}/generate", payload)
                except _EngineFailure as e:
                    errors.append(str(e))
                    self._mark_dead(url, str(e))
                    self.n_retried += 1
                    continue
                res = parse_generate_response(body, rid=rid, prompt_ids=payload["input_ids"],
                                              return_logprob=return_logprob,
                                              routed_layout=self.routed_experts_layout if return_routed_experts else None)
                res.engine_url = url
                return res
        raise AllEnginesFailedError(f"request {rid} failed on {sorted(tried)}: {errors}")

    def _pick(self, tried: set[str]) -> str | None:
        if self.router_url and not self.router_dead:
            return self.router_url
        live = [u for u in self._live() if u not in tried] or None
        return None if live is None else live[next(self._rr) % len(live)]

    # ------------------------------------------------------------ control (every live engine)
    async def _broadcast(self, method: str, path: str, payload: dict | None = None) -> list[Any]:
        """One call per live engine. With ``drop_failed_engines``, an engine whose call fails
        (connection error, timeout, 5xx) is marked dead and left out of the result (and of later
        calls); AllEnginesFailedError when none is left. Otherwise the first failure raises."""
        targets = self._live()
        if not targets:
            raise AllEnginesFailedError(f"{path}: no live engine (dead: {self.dead_engines})")
        res = await asyncio.gather(*(self._request(method, f"{u}{path}", payload) for u in targets),
                                   return_exceptions=True)
        out = []
        for u, r in zip(targets, res):
            if isinstance(r, _EngineFailure) and self.drop_failed_engines:
                self._mark_dead(u, str(r))
            elif isinstance(r, BaseException):
                raise r
            else:
                out.append(r)
        if not out:
            raise AllEnginesFailedError(f"{path}: every engine failed (dead: {self.dead_engines})")
        return out

    async def health(self) -> dict[str, bool]:
        """{url: healthy} for every engine in `urls` (and the router): GET /health answered 200."""
        async def one(u: str) -> bool:
            try:
                await self._request("GET", f"{u}/health")
                return True
            except (_EngineFailure, EngineRequestError):
                return False
        targets = self.urls + ([self.router_url] if self.router_url else [])
        return dict(zip(targets, await asyncio.gather(*(one(u) for u in targets))))

    async def server_info(self) -> list[dict]:
        return await self._broadcast("GET", "/get_server_info")

    async def abort(self, rid: str) -> None:
        """Abort request `rid` on every engine; the request returns finish_reason "abort"."""
        await self._broadcast("POST", "/abort_request", {"rid": rid})

    async def pause(self) -> None:
        await self._broadcast("POST", "/pause_generation", {})

    async def pause_generation(self, mode: str = "in_place") -> None:
        """Pause every engine with SGLang's mode: "abort" | "in_place" (keep requests, resume later) | "retract"."""
        await self._broadcast("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self._broadcast("POST", "/continue_generation", {})

    async def flush_cache(self) -> None:
        await self._broadcast("POST", "/flush_cache", {})

    async def release_memory_occupation(self) -> None:
        """Colocated mode: engines free GPU memory (weights + KV) for training."""
        await self._broadcast("POST", "/release_memory_occupation", {})

    async def resume_memory_occupation(self) -> None:
        await self._broadcast("POST", "/resume_memory_occupation", {})

    async def update_weights_from_disk(self, path: str, weight_version: str) -> None:
        """Every engine reloads weights from HF dir `path`. Raises EngineResponseError on success=False."""
        _check_success(await self._broadcast("POST", "/update_weights_from_disk",
                                             {"model_path": path, "weight_version": weight_version}), path)

    async def update_weights_from_tensor(self, named_tensors: dict, weight_version: str, *,
                                         tp_size: int = 1) -> None:
        """Push {HF name: torch.Tensor} to every engine (colocated update, one bucket).

        Payload by engine kind:
        - embedded: one base64 ``safetensors.torch.save`` blob (CPU tensors).
        - sglang: SGLang's own colocated format -- one ``MultiprocessingSerializer`` string per
          engine TP rank of a ``FlattenedTensorBucket`` (``load_format="flattened_bucket"``;
          CUDA tensors travel as IPC handles, so trainer and engine must share the GPUs). Needs
          the ``sglang`` package (extra ``.[sglang]``); not exercised on CPU machines.
        Raises ImportError (sglang kind without sglang), EngineResponseError on refusal.
        """
        if self.engine_kind == "embedded":
            from safetensors.torch import save
            blob = save({k: v.detach().cpu().contiguous() for k, v in named_tensors.items()})
            payload = {"serialized_named_tensors": [base64.b64encode(blob).decode()], "load_format": None}
        else:
            payload = {"serialized_named_tensors": _sglang_flattened_payload(named_tensors, tp_size),
                       "load_format": "flattened_bucket"}
        payload.update(flush_cache=True, weight_version=weight_version)
        _check_success(await self._broadcast("POST", "/update_weights_from_tensor", payload), weight_version)

    # ------------------------------------------------------------ disaggregated weight-update group
    @property
    def live_urls(self) -> list[str]:
        """Engine urls not marked dead, in order (engine i joins an update group as rank i + 1)."""
        return self._live()

    async def init_weights_update_group(self, master_address: str, master_port: int, world_size: int, *,
                                        group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        """Every live engine i joins the trainer's group as rank ``rank_offset = i + 1`` (SGLang schema).

        Returns once every engine has joined, so the trainer must join (rank 0) concurrently.
        Raises EngineRequestError / EngineResponseError when an engine refuses or times out.
        """
        targets = self._live()
        if not targets:
            raise AllEnginesFailedError(f"/init_weights_update_group: no live engine (dead: {self.dead_engines})")
        body = {"master_address": master_address, "master_port": int(master_port), "world_size": int(world_size),
                "group_name": group_name, "backend": backend}
        res = await asyncio.gather(*(self._request("POST", f"{u}/init_weights_update_group", {**body, "rank_offset": i + 1})
                                     for i, u in enumerate(targets)))
        _check_success(res, f"group {group_name!r} init")

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], *, weight_version: str | None = None,
                                              group_name: str = "weight_update_group", flush_cache: bool = True) -> None:
        """Announce one bucket to every engine; returns after they received it by broadcast from rank 0.

        The trainer must broadcast each tensor (in ``names`` order) while this call is in flight.
        """
        payload = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(map(int, s)) for s in shapes],
                   "group_name": group_name, "flush_cache": flush_cache, "weight_version": weight_version}
        _check_success(await self._broadcast("POST", "/update_weights_from_distributed", payload),
                       f"from_distributed {weight_version}")

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        _check_success(await self._broadcast("POST", "/destroy_weights_update_group", {"group_name": group_name}),
                       f"group {group_name!r} destroy")

    async def weight_versions(self) -> dict[str, str | None]:
        """{url: weight_version} from /get_server_info of every live engine."""
        infos = await self.server_info()
        return {u: i.get("weight_version") for u, i in zip(self._live(), infos)}  # dropped ones left _live()


def _sglang_flattened_payload(named_tensors: dict, tp_size: int) -> list[str]:
    """SGLang colocated update payload: a FlattenedTensorBucket (one flat buffer + metadata),
    serialised with SGLang's MultiprocessingSerializer once per engine TP rank."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        try:
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
        except ImportError:  # older SGLang releases
            from sglang.srt.model_executor.model_runner import FlattenedTensorBucket
    except ImportError as e:
        raise ImportError("engine_kind='sglang' tensor updates need the sglang package "
                          "(pip install .[sglang]); use update_weights_from_disk or the distributed "
                          "update group otherwise") from e
    bucket = FlattenedTensorBucket(named_tensors=list(named_tensors.items()))
    data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return [MultiprocessingSerializer.serialize(data, output_str=True) for _ in range(tp_size)]


def _check_success(results: list[Any], what: str) -> None:
    for r in results:
        if isinstance(r, dict) and r.get("success") is False:
            raise EngineResponseError(f"weight update {what} failed: {r.get('message')}")


def _error_message(text: str) -> str:
    import json
    try:
        body = json.loads(text)
        err = body.get("error", body)
        return err.get("message", text) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return text[:500]
