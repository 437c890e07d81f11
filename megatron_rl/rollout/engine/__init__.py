"""Embedded rollout engine: an SGLang-compatible HTTP server over HF transformers, for CPU runs and tests.

    python -m megatron_rl.rollout.engine --model HF_DIR --host 127.0.0.1 --port 30000

Files: sampling.py (SamplingParams, sampler), model_runner.py (HF forward + KV cache + routed-expert
hooks), scheduler.py (worker thread, abort/pause, weight-update commands), weights.py (tensor payloads,
hub<->in-memory names), server.py (aiohttp endpoints). Speaks SGLang's /generate schema so the same
client drives either engine; not a performance engine (batch-1 forwards, no prefix cache, no streaming).
"""

from .server import EngineConfig, EngineServer
from .weights import decode_named_tensors, encode_named_tensors

__all__ = ["EngineConfig", "EngineServer", "decode_named_tensors", "encode_named_tensors"]
