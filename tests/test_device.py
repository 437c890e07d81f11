"""The CPU backend: patches notice upstream changes, refuse GPU runs, and actually take effect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FINGERPRINTS = Path(__file__).parent / "data" / "megatron_core_0.19.2_fingerprints.json"


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


def test_upstream_code_under_every_patch_is_unchanged():
    """sha1 of each patched upstream function, in a fresh interpreter (before patching), must
    equal the one recorded when the patch was verified. On failure: re-verify the named
    workaround against the new upstream code, then regenerate the JSON."""
    from importlib.metadata import version

    assert version("megatron-core") == "0.19.2", "fingerprints are for megatron-core 0.19.2"
    now = json.loads(_fresh(
        "import json; from megatron_rl import device; "
        "print(json.dumps(device.upstream_fingerprints()))"))
    recorded = json.loads(FINGERPRINTS.read_text())
    assert set(now) == set(recorded), set(now) ^ set(recorded)
    changed = sorted(k for k in now if now[k] != recorded[k])
    assert not changed, f"upstream changed under CPU patches: {changed}"


def test_patches_refuse_cuda_device():
    from megatron_rl import device

    with pytest.raises(RuntimeError, match="refusing"):
        device.apply_cpu_patches("cuda")


def test_resolve_device():
    from megatron_rl.device import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backend only")
def test_patches_take_effect_in_fresh_process():
    """After apply_cpu_patches: CUDA-only code paths run on CPU (each assertion exercises one
    patched function with the real upstream caller)."""
    code = r"""
import torch
from megatron_rl import device
device.apply_cpu_patches()
from megatron.core.utils import GlobalMemoryBuffer
from megatron.core.transformer.utils import get_default_causal_mask
from megatron.core.tensor_parallel import random as mr
from megatron.core.optimizer import optimizer as mo
assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").device.type == "cpu"
m = get_default_causal_mask(4)
assert m.device.type == "cpu" and m[0, 1] and not m[1, 0]
mr.initialize_rng_tracker(force_reset=True)
tr = mr.get_cuda_rng_tracker()
tr.add("a", 5)
before = torch.get_rng_state()
with tr.fork("a"):
    x = torch.rand(3)
with tr.fork("a"):
    y = torch.rand(3)
assert not torch.equal(x, y) and torch.equal(before, torch.get_rng_state())
g = torch.Generator().manual_seed(5)
assert torch.equal(x, torch.rand(3, generator=g))
assert mo.MixedPrecisionOptimizer.__init__.__code__.co_filename.startswith("<megatron_rl.device")
print("ok")
"""
    assert _fresh(code) == "ok"
