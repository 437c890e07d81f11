"""Held-out evaluation: greedy generation + verifier -> exact-match accuracy per split.

The sharded Megatron weights are streamed to rank 0 as HF tensors in bounded buckets
(``checkpoint.export.iter_hf_tensors``, the conversion / weight-sync path) and loaded into an HF
model, which generates with a KV
cache -- the same HF-transformers path as the embedded rollout engine, and ~L times cheaper than
re-running Megatron's forward per token. Keys (identical on every rank):
``eval/<split>/accuracy`` (fraction in [0, 1]), ``eval/<split>/n``,
``eval/<split>/response_len_mean`` (tokens), ``eval/<split>/truncation_rate``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from megatron_rl.data.chat import build_prompt_ids, end_of_turn_id
from megatron_rl.data.loader import load_rows
from megatron_rl.data.synthetic import verify


def gather_hf_model(tr, hf_dir: str, hf_config: dict):
    """Collective: returns an HF ``AutoModelForCausalLM`` (fp32, eval) with the trainer's
    current weights on global rank 0, None elsewhere."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_rl.checkpoint.export import iter_hf_tensors

    sd = {}  # transformers keeps experts stacked in memory: ask for that layout
    for bucket in iter_hf_tensors(tr.model, hf_config, fused_experts=True):  # collective
        sd.update(bucket)
    if torch.distributed.get_rank() != 0:
        return None
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir),
                                             dtype=torch.float32)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def save_hf_checkpoint(tr, hf_dir: str, hf_config: dict, out_dir: str) -> None:
    """Collective: write the current weights as an HF checkpoint (safetensors, config, tokenizer)
    to ``out_dir`` atomically (temp dir + rename; an existing ``out_dir`` is replaced)."""
    from transformers import AutoTokenizer

    model = gather_hf_model(tr, hf_dir, hf_config)
    if model is not None:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".hf_tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    torch.distributed.barrier()


@torch.no_grad()
def hf_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
              batch_size: int = 64, progress=None) -> tuple[list[list[int]], list[bool]]:
    """Greedy responses (token ids, stop token included) and whether each hit a stop token.
    ``progress``: a tqdm-like bar, updated by the prompts of each finished batch (None: none)."""
    stop = [t for t in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    outs, stopped = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=pad)[:, width:]
        for row in gen.tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stop), None)
            outs.append(row[:cut] if cut else row)
            stopped.append(cut is not None)
        if progress is not None:
            progress.update(len(chunk))
    return outs, stopped


def evaluate_splits(tr, tokenizer, hf_dir: str, hf_config: dict, splits: dict[str, str], *,
                    n: int, max_new_tokens: int, verifier=verify, keys=None) -> dict:
    """Evaluate the first ``n`` rows of each ``{name: dataset path}`` split (collective).

    Rows are read by ``data.loader.load_rows`` with the ``keys`` mapping (``RowKeys``; None: the
    schema's own names). ``verifier`` follows ``rollout.rewards.Verifier`` (a float, or a dict
    with "reward" and extra metrics, logged as ``eval/<split>/reward/<name>``); a verifier
    error is raised (no failure is tolerated in an eval)."""
    from megatron_rl.rollout.rewards import RewardRunner
    from megatron_rl.train.logging import progress_bar

    model = gather_hf_model(tr, hf_dir, hf_config)
    out = {}
    if model is not None:
        for name, path in splits.items():
            rows = [r for _, r in load_rows(path, keys=keys)][:n]
            bar = progress_bar(len(rows), f"eval-{name}", leave=False, unit="prompt")  # None off a terminal
            responses, stopped = hf_greedy(model, tokenizer,
                                           [build_prompt_ids(tokenizer, r) for r in rows],
                                           max_new_tokens, progress=bar)
            if bar is not None:
                bar.close()
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            scored = RewardRunner(verifier, max_failure_rate=0.0).score_sync(texts, [r["label"] for r in rows], 1)
            correct = float(scored.rewards.sum())
            out |= {f"eval/{name}/{k}": v for k, v in scored.extra.items()}
            out[f"eval/{name}/accuracy"] = correct / len(rows)
            out[f"eval/{name}/n"] = len(rows)
            out[f"eval/{name}/response_len_mean"] = sum(map(len, responses)) / len(rows)
            out[f"eval/{name}/truncation_rate"] = 1.0 - sum(stopped) / len(rows)
    box = [out]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
