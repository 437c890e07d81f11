"""Which optional backends this process can use: NVIDIA Apex, Transformer Engine, SGLang,
ModelOpt, Weights & Biases and our compiled kernels (`megatron_rl._C`: CPU ops, `megatron_rl._C_cuda`: CUDA ops).

Importing this module imports nothing optional and never raises. Each `has_*()` probes once,
on first call, and caches the answer; a probe that fails for any reason (missing package,
missing CUDA driver, ABI mismatch) answers False and keeps the reason for `describe()`.

Apex pitfall: PyPI's `apex` is an unrelated package. Real NVIDIA Apex is recognised by its
subpackages (`apex.normalization`, `apex.optimizers`, `apex.transformer`), looked up on disk
first, so the unrelated package's `__init__` is never executed.

Left out on purpose: version gating (callers check `describe()`), and any install advice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
from typing import Any

_APEX_SUBPACKAGES = ("normalization", "optimizers", "transformer")
_errors: dict[str, str] = {}  # backend -> why its probe said False


def _try_import(key: str, module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except BaseException as e:  # noqa: BLE001 - some backends sys.exit() or raise odd errors on CPU
        if isinstance(e, KeyboardInterrupt):
            raise
        _errors[key] = f"{type(e).__name__}: {e}"[:300]
        return False


def _apex_layout() -> bool:
    """True when an `apex` package on sys.path has at least one NVIDIA Apex subpackage."""
    try:
        spec = importlib.util.find_spec("apex")  # top level: locates without importing
    except (ImportError, ValueError):
        return False
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any(importlib.machinery.PathFinder.find_spec(f"apex.{sub}", locations) is not None
               for sub in _APEX_SUBPACKAGES)


@functools.cache
def has_apex() -> bool:
    """NVIDIA Apex importable (not PyPI's unrelated `apex`): one of apex.{normalization,
    optimizers,transformer} is on disk and imports."""
    try:
        if not _apex_layout():
            _errors["apex"] = "no NVIDIA Apex (absent, or PyPI's unrelated `apex`)"
            return False
    except Exception as e:  # noqa: BLE001
        _errors["apex"] = f"{type(e).__name__}: {e}"[:300]
        return False
    return any(_try_import("apex", f"apex.{sub}") for sub in _APEX_SUBPACKAGES)


@functools.cache
def has_te() -> bool:
    """transformer_engine.pytorch imports (needs a CUDA build of TE; False on CPU-only TE)."""
    return _is_installed("transformer_engine") and _try_import("te", "transformer_engine.pytorch")


@functools.cache
def has_sglang() -> bool:
    """The SGLang engine package imports (the router, `sglang_router`, is a separate package)."""
    return _is_installed("sglang") and _try_import("sglang", "sglang")


@functools.cache
def has_modelopt() -> bool:
    """NVIDIA ModelOpt's torch side imports."""
    return _is_installed("modelopt") and _try_import("modelopt", "modelopt.torch")


@functools.cache
def has_wandb() -> bool:
    """Weights & Biases (``wandb``, the optional ``megatron_rl[wandb]`` extra) imports."""
    return _is_installed("wandb") and _try_import("wandb", "wandb")


def why_missing(key: str) -> str:
    """Why the probe ``key`` (e.g. "wandb") answered False, or "not installed"."""
    return _errors.get(key, "not installed")


@functools.cache
def has_cpu_ext() -> bool:
    """Our CPU kernels `megatron_rl._C` import (built by setup.py wherever torch is)."""
    if not _try_import("cpu_ext", "torch"):  # _C links against libtorch: load torch first
        return False
    return _try_import("cpu_ext", "megatron_rl._C")


@functools.cache
def has_cuda_ext() -> bool:
    """Our CUDA kernels `megatron_rl._C_cuda` import (built by setup.py where nvcc + a CUDA
    torch are present). `megatron_rl._C` (the op schemas) is loaded first."""
    if not has_cpu_ext():
        _errors["cuda_ext"] = "megatron_rl._C (the op schemas) is missing: " + _errors.get("cpu_ext", "")
        return False
    return _try_import("cuda_ext", "megatron_rl._C_cuda")


def cuda_build_info() -> str | None:
    """`megatron_rl._C_cuda.cuda_build_info()`, or None without the extension."""
    if not has_cuda_ext():
        return None
    from megatron_rl import _C_cuda

    return _C_cuda.cuda_build_info()


def describe_ext() -> str:
    """One line on our two extensions: built or why not."""
    parts = []
    for key, probe in (("cpu_ext", has_cpu_ext), ("cuda_ext", has_cuda_ext)):
        parts.append(f"{key}=ok" if probe() else f"{key}=missing ({_errors.get(key, '?')})")
    return ", ".join(parts)


def _is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - broken metadata
            return None
    return None


def reset() -> None:
    """Forget cached answers (tests, or after installing a backend in-process)."""
    for fn in (has_apex, has_te, has_sglang, has_modelopt, has_wandb, has_cpu_ext, has_cuda_ext):
        fn.cache_clear()
    _errors.clear()


def describe() -> dict[str, Any]:
    """One flat dict for run logs: each backend's availability, version and, if absent, why.

    Probes every backend (imports TE / SGLang if installed: can take seconds).
    """
    out: dict[str, Any] = {
        "torch": _dist_version("torch"),
        "megatron_core": _dist_version("megatron-core", "megatron_core"),
    }
    probes = {
        "apex": (has_apex, ("apex",)),
        "te": (has_te, ("transformer-engine", "transformer_engine", "transformer-engine-torch")),
        "sglang": (has_sglang, ("sglang",)),
        "modelopt": (has_modelopt, ("nvidia-modelopt",)),
        "wandb": (has_wandb, ("wandb",)),
        "cpu_ext": (has_cpu_ext, ()),
        "cuda_ext": (has_cuda_ext, ()),
    }
    for key, (probe, dists) in probes.items():
        ok = probe()
        out[key] = ok
        if dists:
            out[f"{key}_version"] = _dist_version(*dists)
        if not ok and key in _errors:
            out[f"{key}_error"] = _errors[key]
    try:
        out["cuda_ext_info"] = cuda_build_info()
    except Exception as e:  # noqa: BLE001
        out["cuda_ext_info"] = f"{type(e).__name__}: {e}"
    return out
