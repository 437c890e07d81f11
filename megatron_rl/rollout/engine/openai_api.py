"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions` of the embedded engine.

Follows SGLang's OpenAI adapter (python/sglang/srt/entrypoints/openai/serving_{completions,chat}.py):
the same sampling fields as /generate under OpenAI's names (max_tokens / max_completion_tokens,
temperature, top_p, n, stop, seed -> sampling_seed, presence_penalty, frequency_penalty, logit_bias)
plus SGLang's extras (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, skip_special_tokens,
stop_token_ids, no_stop_trim). Chat prompts are rendered with the tokenizer's own chat template
(`apply_chat_template(add_generation_prompt=True)`, `tools` passed through to the template).
`logprobs`: completions take an int (top-k alternatives per token), chat takes logprobs: bool +
top_logprobs: int. `stream: true` answers server-sent events with deltas, then `data: [DONE]`.
Refused with 400 naming the field: echo, suffix, best_of > n, response_format other than text,
function-calling fields (`functions`, `tool_choice` other than none/auto). Tool calls in the output are
not parsed: the assistant text is returned as `content`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from aiohttp import web

from .sampling import ParamError, check_bool, check_int

_SP_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias", "stop": "stop",
             "stop_token_ids": "stop_token_ids", "seed": "sampling_seed", "n": "n", "min_tokens": "min_new_tokens",
             "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim"}


def _sampling(body: dict, default_max: int) -> dict:
    sp = {dst: body[src] for src, dst in _SP_NAMES.items() if body.get(src) is not None}
    mx = body.get("max_completion_tokens", body.get("max_tokens"))
    sp["max_new_tokens"] = default_max if mx is None else mx
    for k in ("echo", "suffix", "regex", "json_schema", "ebnf", "structural_tag", "lora_path",
              "return_hidden_states", "custom_logit_processor", "custom_params", "session_params"):
        if body.get(k):
            raise ParamError(f"{k} is not supported by the embedded engine")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ParamError("best_of is not supported by the embedded engine")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ParamError("response_format (structured output) is not supported by the embedded engine")
    if body.get("functions") or body.get("tool_choice") not in (None, "none", "auto"):
        raise ParamError("tool_choice / functions (forced tool calls) are not supported by the embedded engine")
    return sp


def _prompts(prompt, tokenizer) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return list(prompt)
    raise ParamError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")


def _chat_ids(body: dict, tokenizer) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise ParamError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(msgs):
        if isinstance(m.get("content"), list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in m["content"]):
                raise ParamError(f"messages[{i}].content: only text parts are supported")
            msgs[i] = {**m, "content": "".join(p.get("text", "") for p in m["content"])}
    tools = body.get("tools")
    try:
        out = tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # noqa: BLE001 - jinja errors: the request's messages do not fit the template
        raise ParamError(f"messages could not be rendered with the chat template: {e}") from None
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class OpenAIEndpoints:
    def __init__(self, server):
        self.s = server

    def _items(self, body: dict, prompts: list, top: int) -> tuple[list[dict], int]:
        ctx = self.s.runner.context_length
        gen = {"input_ids" if not isinstance(prompts[0], str) else "text": prompts if len(prompts) > 1 else prompts[0],
               "sampling_params": _sampling(body, ctx), "return_logprob": top >= 0,
               "top_logprobs_num": max(top, 0), "return_text_in_logprobs": top >= 0}
        items, _ = self.s.parse(gen)
        return items, len(prompts)

    def _logprob_request(self, body: dict, chat: bool) -> int:
        """-1 for no logprobs, else the number of top alternatives per token."""
        if chat:
            if not check_bool(body.get("logprobs", False), "logprobs"):
                return -1
            return check_int(body.get("top_logprobs") or 0, "top_logprobs", 0, 20)
        lp = body.get("logprobs")
        return -1 if lp is None else check_int(lp, "logprobs", 0, 20)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self.s.body(request)
        if isinstance(body, web.Response):
            return body
        from .scheduler import QueueFullError
        try:
            prompts = [_chat_ids(body, self.s.runner.tokenizer)] if chat else \
                _prompts(body.get("prompt"), self.s.runner.tokenizer)
            top = self._logprob_request(body, chat)
            items, _ = self._items(body, prompts, top)
            stream = check_bool(body.get("stream", False), "stream")
            model = str(body.get("model") or self.s.cfg.model_path)
            if stream:
                return await self._stream(request, items, chat, model, top)
            outs = await self.s.run(items)
        except ParamError as e:
            return _bad(str(e))
        except (QueueFullError, RuntimeError) as e:
            return _bad(str(e), 503)
        except ValueError as e:
            return _bad(str(e))
        return web.json_response(self._response(outs, chat, model, top))

    def _response(self, outs: list[dict], chat: bool, model: str, top: int) -> dict:
        choices = []
        for i, o in enumerate(outs):
            c = {"index": i, "finish_reason": _finish(o), "logprobs": None}
            if top >= 0:
                c["logprobs"] = _chat_logprobs(o, top) if chat else _completion_logprobs(o, top)
            if chat:
                c["message"] = {"role": "assistant", "content": o["text"]}
            else:
                c["text"] = o["text"]
            choices.append(c)
        prompt_tokens = sum({o["meta_info"]["id"].rsplit("_", 1)[0]: o["meta_info"]["prompt_tokens"]
                             for o in outs}.values())
        completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
        return {"id": uuid.uuid4().hex, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _stream(self, request: web.Request, items: list[dict], chat: bool, model: str, top: int):
        """SSE deltas per choice; text that could still turn into a stop string is held back."""
        events: asyncio.Queue = asyncio.Queue()
        index = {it["rid"]: i for i, it in enumerate(items)}
        hold = {it["rid"]: max([len(s) for s in it["params"].stop] + [1]) - 1 for it in items}
        sent = {it["rid"]: 0 for it in items}
        reqs = self.s.submit_all(items, on_update=events.put_nowait)
        for r in reqs:
            r.future.add_done_callback(lambda f: events.put_nowait(None if f.cancelled() or f.exception()
                                                                   else f.result()))
        rid_, created = uuid.uuid4().hex, int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            if chat:
                for i in range(len(items)):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    await _sse(resp, {"id": rid_, "object": obj, "created": created, "model": model, "choices": [first]})
            pending = len(reqs)
            while pending:
                part = await events.get()
                if part is None:
                    pending -= 1
                    continue
                rid, text = part["meta_info"]["id"], part["text"]
                final = part["meta_info"]["finish_reason"] is not None
                pending -= final
                upto = len(text) if final else max(len(text) - hold[rid], sent[rid])
                while not final and upto > sent[rid] and text[upto - 1] == "\ufffd":  # partial UTF-8
                    upto -= 1
                delta, sent[rid] = text[sent[rid]:upto], max(upto, sent[rid])
                if not delta and not final:
                    continue
                choice = {"index": index[rid], "finish_reason": _finish(part) if final else None, "logprobs": None}
                if chat:
                    choice["delta"] = {"content": delta}
                else:
                    choice["text"] = delta
                await _sse(resp, {"id": rid_, "object": obj, "created": created, "model": model, "choices": [choice]})
            await resp.write(b"data: [DONE]\n\n")
        except BaseException:
            for r in reqs:
                self.s.sched.abort(r.rid)
            raise
        return resp


async def _sse(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(f"data: {json.dumps(obj)}\n\n".encode())


def _finish(o: dict) -> str:
    t = (o["meta_info"]["finish_reason"] or {}).get("type")
    return {"stop": "stop", "length": "length"}.get(t, "abort")


def _completion_logprobs(o: dict, top: int) -> dict:
    lps = o["meta_info"]["output_token_logprobs"]
    tops = o["meta_info"].get("output_top_logprobs") or [[] for _ in lps]
    tokens = [t or "" for _, _, t in lps]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in lps], "text_offset": offsets,
            "top_logprobs": [{(t or ""): lp for lp, _, t in alts} for alts in tops] if top > 0 else None}


def _chat_logprobs(o: dict, top: int) -> dict:
    lps = o["meta_info"]["output_token_logprobs"]
    tops = o["meta_info"].get("output_top_logprobs") or [[] for _ in lps]
    ent = lambda lp, t: {"token": t or "", "logprob": lp, "bytes": list((t or "").encode())}  # noqa: E731
    return {"content": [{**ent(lp, t), "top_logprobs": [ent(a, b) for a, _, b in alts][:top]}
                        for (lp, _, t), alts in zip(lps, tops)]}


def _bad(msg: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": msg, "type": "invalid_request_error", "code": status}},
                             status=status)


def add_openai_routes(app: web.Application, server) -> None:
    """Register /v1/completions and /v1/chat/completions on `app` (served by `server`)."""
    ep = OpenAIEndpoints(server)
    app.router.add_post("/v1/completions", ep.completions)
    app.router.add_post("/v1/chat/completions", ep.chat)
