"""Shared fixtures: a tiny Qwen3-MoE HF checkpoint made locally by tools/make_tiny_model.py."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/_*.py worker modules


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> str:
    """A 4-layer, 8-expert top-2 tiny model (the project's embedded default), seed 0."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    load_tool("make_tiny_model").make_tiny_model(out, seed=0)
    return os.fspath(out)


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    """One embedded engine (no router) on the tiny model, for the weight-sync tests."""
    from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig

    cfg = LaunchConfig(model_path=tiny_hf_dir, num_engines=1, router=False, health_timeout_s=120)
    with EngineLauncher(cfg) as launcher:
        yield launcher
