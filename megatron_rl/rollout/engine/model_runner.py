"""HF transformers model runner: batched prefill / decode over a padded `KVBatch`, routed-expert
capture, in-place weight updates.

Legend: N = sequences prefilled together, B = running rows, S = padded columns, P = prompt tokens,
L = MoE layers, K = router top-k, V = vocab.

Generation runs the model's own forward (`AutoModelForCausalLM`, eval, `DynamicCache`) over a left-padded
batch with a 2-D attention mask and explicit per-row `position_ids` -- the layout of HF `generate`
with padding -- so a row's logits equal an unpadded batch-1 forward of its tokens up to float rounding
(the tests bound it by 1e-5 in float32). Why not transformers' continuous batching (`generate_batch`,
paged attention): on this size of model on CPU it measured 10-20x slower than the padded forward
(see README, "Embedded engine"), the per-token Python of its paged cache dominating.

Routed experts: a forward hook on every Qwen3-MoE-style router (`*TopKRouter`, transformers 5 returns
`(router_logits, router_scores, router_indices)`) records `router_indices` [B*T, K] -- the very tensor
the sparse block hands to its experts; padded positions are dropped before they reach a request.
Models without such routers report `num_moe_layers == 0`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from megatron_rl.quant import fp8_engine

from .kv_batch import KVBatch
from .weights import load_named_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_router(module: torch.nn.Module) -> bool:
    return type(module).__name__.lower().endswith("topkrouter") and hasattr(module, "top_k")


class ModelRunner:
    """Owns the model and tokenizer; all methods run on the scheduler thread (not thread-safe).

    Args:
        model_path: HF directory (config.json, safetensors, tokenizer).
        dtype: "float32" | "bfloat16" | "float16" (parameters; logits are cast to float32).
        context_length: max prompt+completion tokens; default config.max_position_embeddings.
        device: torch device string ("cpu", "cuda", "cuda:1"); model, KV cache and logits live there.
    Raises ValueError for an unknown dtype, RuntimeError for a CUDA device without CUDA.
    """

    def __init__(self, model_path: str, dtype: str = "float32", context_length: int | None = None,
                 device: str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: torch.cuda.is_available() is False")
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._routes: list[torch.Tensor] = []
        self._hooks: list = []
        self.model_path = ""
        self.load(model_path)
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.context_length = int(context_length or getattr(cfg, "max_position_embeddings", 4096))
        self.eos_token_ids = self._eos_ids()

    # -- loading ------------------------------------------------------------------------------------
    def load(self, model_path: str, local_only: bool = False) -> None:
        """(Re)load weights from an HF directory (bf16/fp32, or blockwise FP8: see quant.fp8_engine),
        replacing the model; hooks are re-registered.

        `local_only`: never reach a hub (the /update_weights_from_disk path). The old model keeps
        serving if this raises (OSError, ValueError, KeyError, ... from transformers / fp8_engine)."""
        model = fp8_engine.from_pretrained(model_path, DTYPES[self.dtype],  # FP8-block dirs dequantised
                                           local_files_only=local_only)
        model.eval().requires_grad_(False).to(self.device)
        for h in self._hooks:
            h.remove()
        self.model, self.model_path = model, model_path
        self.routers = [m for m in model.modules() if _is_router(m)]
        self.top_k = int(self.routers[0].top_k) if self.routers else 0
        self._hooks = [r.register_forward_hook(self._capture) for r in self.routers]

    def _capture(self, _module, _inp, out) -> None:
        self._routes.append(out[2].detach())  # router_indices [B*T, K]

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def num_moe_layers(self) -> int:
        return len(self.routers)

    # -- forward ------------------------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
             keep_last: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward: ids/pos long [B, T], mask long [B, S+T] -> (float32 logits of the last
        `keep_last` positions [B, keep_last, V], routes int32 [B, T, L, K] or None)."""
        self._routes = []
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True, logits_to_keep=keep_last)
        routes = None
        if self._routes:
            b, t = ids.shape
            routes = torch.stack([r.reshape(b, t, -1) for r in self._routes], dim=2).to(torch.int32)
        self._routes = []
        return out.logits.to(torch.float32), routes

    @torch.inference_mode()
    def prefill(self, seqs: list[list[int]], keep_last: int = 1
                ) -> tuple[KVBatch, torch.Tensor, list[torch.Tensor], list[np.ndarray] | None]:
        """Batched prefill of N prompts (left-padded to the longest, P_max).

        Returns (KVBatch of N rows, last-position float32 logits [N, V] on the device,
        per-row float32 logits [min(keep_last, P_i), V] of the prompt's LAST positions (only those
        are projected to the vocab: input logprobs need no more),
        per-row routes int32 [P_i, L, K] (numpy) or None for a dense model).
        """
        p_max = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), p_max, dtype=torch.long)
        mask = torch.zeros(len(seqs), p_max, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, p_max - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, p_max - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.config)
        keep_last = max(1, min(keep_last, p_max))
        logits, routes = self._run(ids, mask, pos, cache, keep_last)
        tails = [logits[i, max(keep_last - len(s), 0):] for i, s in enumerate(seqs)]
        per_row = None
        if routes is not None:
            r = routes.cpu().numpy()
            per_row = [r[i, p_max - len(s):] for i, s in enumerate(seqs)]
        return KVBatch(cache, mask), logits[:, -1], tails, per_row

    @torch.inference_mode()
    def decode(self, kv: KVBatch, tokens: list[int]) -> tuple[torch.Tensor, np.ndarray | None]:
        """Feed one token per row of `kv` (B rows). Returns (float32 logits [B, V] on the device,
        routes int32 [B, L, K] numpy or None)."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # [B, 1]
        pos = kv.lengths.unsqueeze(1).to(self.device)  # [B, 1]: next position of each row
        kv.append_column()
        logits, routes = self._run(ids, kv.mask, pos, kv.cache, False)
        return logits[:, -1], None if routes is None else routes[:, 0].cpu().numpy()

    # -- weights ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def update_from_tensors(self, named: dict[str, torch.Tensor]) -> int:
        """Copy tensors into the live parameters (names: in-memory or hub per-expert); returns count.

        FP8 payloads (float8_e4m3fn + ``*_scale_inv``) are dequantised first (quant.fp8_engine).
        Raises KeyError for an unknown name or an FP8 tensor without its scale, ValueError for a
        shape mismatch, a non-float tensor for a float parameter, or non-finite values -- all
        before anything is written.
        """
        return load_named_tensors(self.model, fp8_engine.dequantize_update(self.model, named))

    def decode_text(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; invalid UTF-8 byte sequences become U+FFFD (never raises)."""
        return self.tokenizer.decode(ids, skip_special_tokens=bool(skip_special_tokens))
