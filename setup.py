"""Build and install megatron_rl; compile csrc/ into `megatron_rl._C` where CUDA is present.

The CUDA extension is optional. It is built only when all of these hold:
  (a) torch is importable at build time and is a CUDA build (`torch.version.cuda`),
  (b) nvcc is found: $CUDA_HOME / $CUDA_PATH, then /usr/local/cuda, then $PATH,
  (c) MEGATRON_RL_SKIP_CUDA=1 is not set,
  (d) csrc/ holds at least one .cu / .cpp source.
torch must be importable at build time, so install with
    pip install --no-build-isolation -e .
in an environment that already has torch (plain `pip install .` builds in an isolated
environment without torch and therefore installs the pure-Python package only).

Environment switches:
  MEGATRON_RL_SKIP_CUDA=1     never build the extension (CPU machines, fast installs)
  MEGATRON_RL_REQUIRE_CUDA=1  fail the install when the extension can't be built
  TORCH_CUDA_ARCH_LIST        target archs, default "9.0" (Hopper); e.g. "8.0;9.0;10.0"
  MAX_JOBS                    parallel nvcc jobs (with ninja)

nvcc vs torch CUDA version: torch's cpp_extension refuses a *major* mismatch (nvcc 12 vs
torch cu13) and only warns on a minor one (nvcc 13.0 vs torch cu13.2, as on our CPU boxes);
with REQUIRE unset a refusal is reported as a warning and the install goes on.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_NAME = "megatron_rl._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _note(msg: str) -> None:
    print(f"[megatron_rl setup] {msg}", file=sys.stderr, flush=True)


def _version() -> str:
    init = ROOT / "megatron_rl" / "__init__.py"
    if init.exists():
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init.read_text(), re.M)
        if m:
            return m.group(1)
    return "0.1.0"


def _find_cuda_home() -> str | None:
    """Directory holding bin/nvcc: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then nvcc on $PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return home
    return None


def _pip_cuda_library_includes(cuda_home: str) -> list[str]:
    """Header dirs of the pip CUDA libraries torch depends on (nvidia-cusparse, -cublas, ...).

    A minimal toolkit (nvcc + cudart, as on our CPU boxes and the lent GPU machines) lacks
    cusparse.h / cublas_v2.h, which ATen/cuda/CUDAContext.h includes; torch's own wheels bring
    them under site-packages/nvidia/*/include. Used only when CUDA_HOME lacks them.
    """
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    wanted = ("cusparse.h", "cublas_v2.h", "cusolverDn.h", "curand.h")
    dirs = {str(d) for r in roots for d in sorted(Path(r).glob("*/include"))
            if any((d / h).is_file() for h in wanted)}
    return sorted(dirs)


def _cuda_sources() -> list[str]:
    srcs = sorted(ROOT.glob("csrc/**/*.cu")) + sorted(ROOT.glob("csrc/**/*.cpp"))
    return [str(p.relative_to(ROOT)) for p in srcs]


def _cuda_extension():
    """Return (ext_modules, build_ext_base); ([], setuptools build_ext) when we skip, with the reason."""
    if _flag("MEGATRON_RL_SKIP_CUDA"):
        return [], build_ext, "MEGATRON_RL_SKIP_CUDA=1"
    sources = _cuda_sources()
    if not sources:
        return [], build_ext, "no sources under csrc/"
    try:
        import torch
    except Exception as e:  # torch absent (e.g. isolated build env) or broken
        return [], build_ext, f"torch not importable at build time ({type(e).__name__}: {e}); " \
                              "use `pip install --no-build-isolation`"
    if not torch.version.cuda:
        return [], build_ext, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return [], build_ext, "nvcc not found (set CUDA_HOME)"
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: point it at the nvcc we chose.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={  # no -std: torch's BuildExtension adds the one it needs (C++20)
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    ext.include_dirs += _pip_cuda_library_includes(cuda_home)  # after CUDA_HOME's own headers
    _note(f"building {EXT_NAME} from {len(sources)} sources with {cuda_home}/bin/nvcc, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, torch cu{torch.version.cuda}")
    return [ext], BuildExtension, None


EXT_MODULES, _BuildExtBase, SKIP_REASON = _cuda_extension()
if SKIP_REASON:
    _note(f"not building {EXT_NAME}: {SKIP_REASON}; the pure-PyTorch paths are used")


class OptionalBuildExt(_BuildExtBase):
    """build_ext that turns a failed CUDA compile into a warning unless MEGATRON_RL_REQUIRE_CUDA=1."""

    def _give_up(self, err: BaseException) -> None:
        if _flag("MEGATRON_RL_REQUIRE_CUDA"):
            raise err
        bar = "=" * 78
        _note(f"\n{bar}\nWARNING: could not build {EXT_NAME}: {type(err).__name__}: {err}\n"
              f"Installing without it; megatron_rl falls back to its pure-PyTorch ops.\n"
              f"Set MEGATRON_RL_REQUIRE_CUDA=1 to make this an error, "
              f"MEGATRON_RL_SKIP_CUDA=1 to skip the attempt.\n{bar}")
        # Drop the extension so later steps (copying outputs, editable wheels) don't look for it.
        self.extensions = []
        self.distribution.ext_modules = []

    def build_extensions(self) -> None:
        try:  # torch's BuildExtension checks nvcc/compiler versions here, before compiling
            super().build_extensions()
        except Exception as err:
            self._give_up(err)

    def run(self) -> None:
        try:
            super().run()
        except Exception as err:
            self._give_up(err)


setup(
    name="megatron_rl",
    version=_version(),
    description="Megatron-Core plugin for RL and SFT post-training of MoE LLMs",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]),
    python_requires=">=3.12",
    install_requires=[
        "megatron-core==0.19.2",
        "torch>=2.6",
        "transformers>=4.51",
        "safetensors>=0.4.3",
        "tokenizers>=0.21",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "psutil>=5.9",  # megatron.core.dist_checkpointing async writer
        "math-verify>=0.7",
        "sglang-router>=0.2",
        "aiohttp>=3.9",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        "sglang": ["sglang>=0.4.6"],
        "modelopt": ["nvidia-modelopt>=0.27", "requests"],  # modelopt.torch imports requests
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "hypothesis>=6.100", "openai>=1.40",
                "accelerate>=1.0",  # transformers' FP8 loader, read in tests/test_fp8_checkpoint.py
                "nvidia-modelopt>=0.27", "requests"],  # tests/test_fp8_qat.py (skipped without it)
    },
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
