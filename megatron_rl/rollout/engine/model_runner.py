"""HF transformers model runner: prefill/decode of one sequence with a KV cache, routed-expert capture,
in-place weight updates.

Legend: P = prompt tokens, T = tokens fed in one forward, L = MoE layers, K = router top-k, V = vocab.

Generation runs the model's own forward (`AutoModelForCausalLM`, eval, `DynamicCache`) one sequence at a
time (batch 1, no padding), so greedy outputs equal `model.generate(do_sample=False)` exactly.
Logprobs (`sampling.token_logprob`) are those of SGLang's sampler: log_softmax of the float32 logits
divided by the request's temperature (before top-k/top-p), or of the raw logits for greedy requests
and under SGLANG_RETURN_ORIGINAL_LOGPROB=1; the trainer scales its logits by the same temperature.

Routed experts: a forward hook on every Qwen3-MoE-style router (`*TopKRouter`, transformers 5 returns
`(router_logits, router_scores, router_indices)`) records `router_indices` [T, K] -- the very tensor
the sparse block hands to its experts. Models without such routers report `num_moe_layers == 0`.
"""

from __future__ import annotations


import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from megatron_rl.quant import fp8_engine

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
    """

    def __init__(self, model_path: str, dtype: str = "float32", context_length: int | None = None):
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._routes: list[torch.Tensor] = []
        self._hooks: list = []
        self.model_path = ""
        self.load(model_path)
        cfg = self.model.config
        self.context_length = int(context_length or getattr(cfg, "max_position_embeddings", 4096))
        self.eos_token_ids = self._eos_ids()

    # -- loading ------------------------------------------------------------------------------------
    def load(self, model_path: str) -> None:
        """(Re)load weights from an HF directory (bf16/fp32, or blockwise FP8: see quant.fp8_engine),
        replacing the model; hooks are re-registered."""
        model = fp8_engine.from_pretrained(model_path, DTYPES[self.dtype])  # FP8-block dirs dequantised
        model.eval().requires_grad_(False)
        for h in self._hooks:
            h.remove()
        self.model, self.model_path = model, model_path
        self.routers = [m for m in model.modules() if _is_router(m)]
        self.top_k = int(self.routers[0].top_k) if self.routers else 0
        self._hooks = [r.register_forward_hook(self._capture) for r in self.routers]

    def _capture(self, _module, _inp, out) -> None:
        self._routes.append(out[2].detach())  # router_indices [T, K]

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
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, token_ids: list[int], cache: DynamicCache) -> tuple[torch.Tensor, np.ndarray | None]:
        """Feed `token_ids` (T >= 1) after what `cache` holds.

        Returns (logits float32 [V] of the last position, routes int32 [T, L, K] or None).
        """
        self._routes = []
        ids = torch.tensor([token_ids], dtype=torch.long)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].to(torch.float32)
        routes = None
        if self._routes:
            routes = torch.stack(self._routes, dim=1).to(torch.int32).numpy()  # [T, L, K]
        self._routes = []
        return logits, routes

    # -- weights ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def update_from_tensors(self, named: dict[str, torch.Tensor]) -> int:
        """Copy tensors into the live parameters (names: in-memory or hub per-expert); returns count.

        FP8 payloads (float8_e4m3fn + ``*_scale_inv``) are dequantised first (quant.fp8_engine).
        Raises KeyError for an unknown name or an FP8 tensor without its scale, ValueError for a
        shape mismatch.
        """
        return load_named_tensors(self.model, fp8_engine.dequantize_update(self.model, named))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; invalid UTF-8 byte sequences become U+FFFD (never raises)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
