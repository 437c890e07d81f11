"""SGLang `/generate` response dicts of the embedded engine (one per sequence), from a request's state.

Legend: P = prompt tokens, C = completion tokens, L = MoE layers, K = router top-k.

Shapes follow SGLang's `meta_info` (python/sglang/srt/managers/tokenizer_manager.py, `convert_logprob_style`):
    output_token_logprobs  [[logprob, token_id, text|None]] * C
    output_top_logprobs    [[[logprob, token_id, text|None]] * top_logprobs_num] * C
    input_token_logprobs   [[logprob|None, token_id, text|None]] for prompt positions
                           logprob_start_len .. P-1 (position 0 has no logprob: None)
    input_top_logprobs     like output_top_logprobs per prompt position (None at position 0)
    routed_experts         base64 of int32 [P + C - 1, L, K] (the tokens the model was fed)
"""

from __future__ import annotations

import base64
import time
from typing import Callable

import numpy as np


def _triples(pairs, decode: Callable[[list[int]], str] | None) -> list:
    return [[lp, t, decode([t]) if decode else None] for lp, t in pairs]


def build_response(req, reason: dict, decode: Callable[[list[int], bool], str], layout: tuple[int, int],
                   weight_version: str) -> dict:
    """SGLang's /generate response for one sequence (text excludes a matched stop, like SGLang).

    `req`: a scheduler Request; `decode(ids, skip_special_tokens) -> str`; `layout` = (L, K).
    """
    p, ids = req.params, req.output_ids
    trim_tok = reason.get("type") == "stop" and isinstance(reason.get("matched"), int) and not p.no_stop_trim
    text = decode(ids[:-1] if trim_tok else ids, p.skip_special_tokens)
    if isinstance(reason.get("matched"), str) and not p.no_stop_trim:
        cut = text.find(reason["matched"])
        text = text[:cut] if cut >= 0 else text
    meta = {"id": req.rid, "finish_reason": reason or None, "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": weight_version,
            "e2e_latency": time.monotonic() - req.created}
    if req.return_logprob:
        tok_text = (lambda t: decode(t, False)) if req.return_text_in_logprobs else None
        meta["output_token_logprobs"] = _triples(zip(req.logprobs, ids), tok_text)
        meta["input_token_logprobs"] = _triples(req.input_logprobs, tok_text)
        if req.top_logprobs_num > 0:
            meta["output_top_logprobs"] = [_triples(top, tok_text) for top in req.top_logprobs]
            meta["input_top_logprobs"] = [None if top is None else _triples(top, tok_text)
                                          for top in req.input_top_logprobs]
    if req.return_routed_experts:
        n = len(req.input_ids) + len(ids) - 1
        arr = np.concatenate(req.routes, axis=0)[:n] if req.routes else np.zeros((0, *layout), np.int32)
        meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(arr, np.int32).tobytes()).decode("ascii")
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def error_response(req, message: str, weight_version: str) -> dict:
    """The response of a request that failed inside the engine: finish_reason abort with the error."""
    reason = {"type": "abort", "message": message, "status_code": 500}
    return {"text": "", "output_ids": list(req.output_ids),
            "meta_info": {"id": req.rid, "finish_reason": reason, "prompt_tokens": len(req.input_ids),
                          "completion_tokens": len(req.output_ids), "cached_tokens": 0,
                          "weight_version": weight_version, "e2e_latency": time.monotonic() - req.created}}
