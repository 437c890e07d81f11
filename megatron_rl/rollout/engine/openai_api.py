"""OpenAI-compatible endpoints of the embedded engine (placeholder until implemented)."""

from __future__ import annotations


def add_openai_routes(app, server) -> None:
    """Register /v1/completions and /v1/chat/completions on `app` (served by `server`)."""
