"""Validation of `/generate` bodies (SGLang's `GenerateReqInput`, python/sglang/srt/managers/io_struct.py).

Every malformed field raises `ParamError` naming it (-> HTTP 400, never 500). Fields the embedded engine
cannot honour are refused by name when set (not null/false): multimodal data, `input_embeds`, LoRA,
`return_hidden_states`, `custom_logit_processor`, `session_params`, `token_ids_logprob`. Unknown
top-level keys are ignored, as SGLang's request dataclass does; unknown `sampling_params` keys are not.

`n > 1` (a sampling param) expands each prompt into n sequences with rids `{rid}_{j}` and seeds
`sampling_seed + j`; the response is then a list, prompt-major (prompt i, copy j at i * n + j).
"""

from __future__ import annotations

import uuid
from dataclasses import replace

from .sampling import ParamError, SamplingParams, check_bool, check_int

UNSUPPORTED = ("input_embeds", "image_data", "audio_data", "video_data", "lora_path", "lora_id",
               "return_hidden_states", "custom_logit_processor", "session_params", "token_ids_logprob")


def _per_item(body: dict, key: str, n: int, default) -> list:
    """A batched request's field: one value for all, or a list of exactly n (raises ParamError)."""
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, list) and key != "stop":
        if len(v) != n:
            raise ParamError(f"{key} has {len(v)} entries for a batch of {n}")
        return v
    return [v] * n


def _token_list(seq, name: str, vocab: int) -> list[int]:
    if not isinstance(seq, list):
        raise ParamError(f"{name} must be a list of token ids, got {type(seq).__name__}")
    if not seq:
        raise ParamError(f"{name}: the input is empty (0 tokens)")
    for t in seq:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ParamError(f"{name} must hold ints in [0, {vocab}), got {t!r}")
    return list(seq)


def _prompts(body: dict, tokenizer, vocab: int) -> tuple[list[list[int]], bool]:
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise ParamError("Either text or input_ids should be provided (exactly one).")
    if text is not None:
        batched = isinstance(text, list)
        texts = text if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ParamError("text must be a string or a non-empty list of strings")
        return [_token_list(tokenizer.encode(t), f"text[{i}]", vocab) for i, t in enumerate(texts)], batched
    if not isinstance(ids, list) or not ids:
        raise ParamError("input_ids must be a non-empty list of token ids or of such lists")
    batched = isinstance(ids[0], list)
    seqs = ids if batched else [ids]
    return [_token_list(s, f"input_ids[{i}]" if batched else "input_ids", vocab) for i, s in enumerate(seqs)], batched


def parse_generate(body, tokenizer, vocab: int, context_length: int) -> tuple[list[dict], bool]:
    """Validate a /generate JSON body -> (kwargs of one scheduler Request per sequence, list response?).

    Raises ParamError naming the offending field.
    """
    if not isinstance(body, dict):
        raise ParamError(f"the request body must be a JSON object, got {type(body).__name__}")
    for k in UNSUPPORTED:
        if body.get(k) not in (None, False, [], {}):
            raise ParamError(f"{k} is not supported by the embedded engine")
    seqs, batched = _prompts(body, tokenizer, vocab)
    n = len(seqs)
    rids = body.get("rid")
    if rids is None:
        rids = [uuid.uuid4().hex for _ in range(n)]
    elif isinstance(rids, str):
        rids = [rids] if n == 1 else [f"{rids}_{i}" for i in range(n)]
    elif not (isinstance(rids, list) and len(rids) == n and all(isinstance(r, str) for r in rids)):
        raise ParamError(f"rid must be a string or a list of {n} strings")
    sps = _per_item(body, "sampling_params", n, {})
    per = {k: _per_item(body, k, n, d) for k, d in (("return_logprob", False), ("logprob_start_len", -1),
                                                    ("top_logprobs_num", 0), ("return_text_in_logprobs", False),
                                                    ("return_routed_experts", False))}
    items, fan_out = [], False
    for i, seq in enumerate(seqs):
        where = f"sampling_params[{i}]" if isinstance(body.get("sampling_params"), list) else "sampling_params"
        params = SamplingParams.from_dict(sps[i], vocab, where)
        if len(seq) >= context_length:
            raise ParamError(f"input_ids: the input ({len(seq)} tokens) is longer than the model's context "
                             f"length ({context_length} tokens).")
        kw = dict(input_ids=seq,
                  return_logprob=check_bool(per["return_logprob"][i], "return_logprob"),
                  logprob_start_len=check_int(per["logprob_start_len"][i], "logprob_start_len", -1, len(seq) - 1),
                  top_logprobs_num=check_int(per["top_logprobs_num"][i], "top_logprobs_num", 0, vocab),
                  return_text_in_logprobs=check_bool(per["return_text_in_logprobs"][i], "return_text_in_logprobs"),
                  return_routed_experts=check_bool(per["return_routed_experts"][i], "return_routed_experts"))
        fan_out |= params.n > 1
        for j in range(params.n):
            seed = None if params.sampling_seed is None else (params.sampling_seed + j) % (2**63)
            copy = replace(params, sampling_seed=seed) if j else params
            rid = rids[i] if params.n == 1 else f"{rids[i]}_{j}"
            items.append(dict(rid=rid, params=copy, **kw))
    return items, batched or fan_out
