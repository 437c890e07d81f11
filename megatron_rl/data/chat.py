"""Chat-template tokenisation: SFT samples with an assistant-only loss mask, and rollout prompts.

The template is the tokenizer's own (`tokenizer_config.json`'s `chat_template`, applied by HF
`tokenizer.apply_chat_template`), so SFT, rollouts and eval see exactly the serving format.

Assistant mask, for each assistant turn i (source: the prefix trick used by TRL / OpenRLHF):
    prefix = ids(messages[:i], add_generation_prompt=True)   # ends with "<|im_start|>assistant\\n"
    full   = ids(messages[:i+1])
    full must start with prefix (else TemplateError); full[len(prefix):] is the turn's response,
    masked up to and including its last end-of-turn token ("<|im_end|>"; the tokenizer's eos when
    the vocabulary has no "<|im_end|>"); template tokens after it (ChatML's "\\n") stay 0.
Left out: templates that rewrite earlier turns (e.g. Qwen3 stripping old <think> blocks) fail the
prefix check loudly instead of being special-cased.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_rl.data.jsonl import DatasetError, location


class TemplateError(DatasetError):
    """The chat template does not render a conversation prefix as a token prefix."""


def row_messages(row: dict) -> list[dict]:
    """The conversation of a row: `messages`, or [user: prompt] (+ [assistant: solution] if present)."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    messages = [{"role": "user", "content": row["prompt"]}]
    if "solution" in row:
        messages.append({"role": "assistant", "content": row["solution"]})
    return messages


def _ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int | None:
    """Id of "<|im_end|>" if the vocabulary has it, else the tokenizer's eos id (may be None)."""
    vocab = tokenizer.get_vocab()
    return vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id


def build_prompt_ids(tokenizer: Any, row: dict) -> list[int]:
    """Token ids of the row's prompt turns plus the generation prompt, for rollouts and eval.

    For a `messages` row ending with an assistant turn that turn is dropped (it is the target).
    """
    messages = row_messages(row)
    if "messages" not in row:
        messages = messages[:1]
    elif messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _ids(tokenizer, messages, add_generation_prompt=True)


def build_sft_sample(tokenizer: Any, row: dict, max_len: int, *, path: str | os.PathLike | None = None,
                     line: int | None = None) -> dict[str, list[int]]:
    """Tokenise a conversation and mark the tokens SFT trains on.

    Returns {"input_ids": list[int] (len L), "loss_mask": list[int] (len L, 1 on assistant response
    tokens incl. the end-of-turn token, 0 on system/user/template tokens)}.
    Raises DatasetError if the row has no assistant turn or L > max_len (never truncates), and
    TemplateError if the template breaks the prefix property; both name path:line when given.
    """
    where = location(path, line)
    messages = row_messages(row)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DatasetError(f"{where}: no assistant turn to train on (prompt rows need 'solution')")
    eot = end_of_turn_id(tokenizer)
    input_ids = _ids(tokenizer, messages, add_generation_prompt=False)
    loss_mask = [0] * len(input_ids)
    for i in turns:
        prefix = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = _ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prefix)] != prefix or input_ids[: len(full)] != full:
            raise TemplateError(f"{where}: chat template breaks the prefix property at message {i}; "
                                "cannot locate the assistant tokens")
        span = full[len(prefix):]
        stop = len(span)
        if eot is not None and eot in span:
            stop = len(span) - span[::-1].index(eot)  # through the last end-of-turn token
        for t in range(len(prefix), len(prefix) + stop):
            loss_mask[t] = 1
    if len(input_ids) > max_len:
        raise DatasetError(f"{where}: sample has {len(input_ids)} tokens > max_len {max_len}; "
                           "raise max_len or filter the dataset (no silent truncation)")
    return {"input_ids": input_ids, "loss_mask": loss_mask}
