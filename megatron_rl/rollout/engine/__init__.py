"""Embedded rollout engine: an SGLang-compatible HTTP server over HF transformers, for CPU runs and tests.

    python -m megatron_rl.rollout.engine --model HF_DIR --host 127.0.0.1 --port 30000

Files: sampling.py (SamplingParams: SGLang's fields, validated), sampler.py (batched sampler, SGLang's
order of operations), io_struct.py (/generate body validation), model_runner.py (batched HF forward,
routed-expert hooks), kv_batch.py (the running batch's padded KV cache), scheduler.py (worker thread,
continuous batching, abort/pause, weight-update commands), response.py (SGLang response dicts),
weights.py (tensor payloads, hub<->in-memory names), weight_api.py + server.py + openai_api.py
(aiohttp endpoints). Speaks SGLang's /generate schema so the same client drives either engine.
Not done: prefix cache, chunked prefill, grammars, LoRA, speculative decoding, tensor parallelism.
"""

from .server import EngineConfig, EngineServer
from .weights import decode_named_tensors, encode_named_tensors

__all__ = ["EngineConfig", "EngineServer", "decode_named_tensors", "encode_named_tensors"]
