"""`python -m megatron_rl.rollout.engine --model HF_DIR --host H --port P [--dtype ...]` -- serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from .server import EngineConfig, EngineServer


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    ap = argparse.ArgumentParser(prog="python -m megatron_rl.rollout.engine", description=__doc__)
    ap.add_argument("--model", "--model-path", dest="model_path", required=True, help="HF model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--device", default="cpu", help="torch device of the model, KV cache and sampling (cuda, cuda:1)")
    ap.add_argument("--max-running-requests", type=int, default=64, help="rows of the running batch")
    ap.add_argument("--max-queued-requests", type=int, default=4096, help="waiting requests; more get HTTP 503")
    ap.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (all but GET /health)")
    ap.add_argument("--seed", type=int, default=0, help="base seed for requests without sampling_seed")
    ap.add_argument("--context-length", type=int, default=None, help="default: max_position_embeddings")
    ap.add_argument("--weight-version", default="default")
    args = ap.parse_args(argv)
    for flag in ("max_running_requests", "max_queued_requests"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    return EngineConfig(**vars(args))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    server = EngineServer(cfg)
    logging.getLogger(__name__).info("embedded engine serving %s on http://%s:%d", cfg.model_path, cfg.host, cfg.port)
    web.run_app(server.app(), host=cfg.host, port=cfg.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
