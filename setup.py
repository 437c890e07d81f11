"""Build and install megatron_rl; compile csrc/ into `megatron_rl._C` (CPU) and `megatron_rl._C_cuda`.

Two extensions, both registering ops under torch.ops.megatron_rl (see csrc/fused_loss.h):
  megatron_rl._C       plain C++ (csrc/*.cpp, no CUDA headers): built wherever torch is
                       importable at build time, vectorised (at::vec) for the build machine:
                       AVX-512 or AVX2 + FMA on x86-64 ($MEGATRON_RL_CPU_SIMD overrides:
                       avx512 | avx2 | none; set it when building for another machine).
  megatron_rl._C_cuda  csrc/cuda/*.cu + *.cpp: built where all of these hold:
    (a) torch is a CUDA build (`torch.version.cuda`),
    (b) nvcc is found: $CUDA_HOME / $CUDA_PATH, then /usr/local/cuda, then $PATH,
    (c) MEGATRON_RL_SKIP_CUDA=1 is not set.
torch must be importable at build time, so install with
    pip install --no-build-isolation -e .
in an environment that already has torch (plain `pip install .` builds in an isolated
environment without torch and therefore installs the pure-Python package only).

Environment switches:
  MEGATRON_RL_SKIP_CUDA=1     never build the CUDA extension (the CPU one is still built)
  MEGATRON_RL_REQUIRE_CUDA=1  fail the install when the CUDA extension can't be built
                              (tests/test_fused_loss.py also fails when nvcc + CUDA torch exist
                              but megatron_rl._C_cuda was not built, so CI catches compile errors)
  TORCH_CUDA_ARCH_LIST        target archs, default "9.0a" (Hopper); e.g. "8.0;9.0;10.0"
  MAX_JOBS                    parallel compile jobs (with ninja)

nvcc vs torch CUDA version: torch's cpp_extension refuses a *major* mismatch (nvcc 12 vs
torch cu13) and only warns on a minor one (nvcc 13.0 vs torch cu13.2, as on our CPU boxes);
with REQUIRE unset a refusal is reported as a warning and the install goes on.
A failed CPU extension build always fails the install.
"""

import os
import platform
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CPU_EXT, CUDA_EXT = "megatron_rl._C", "megatron_rl._C_cuda"


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


def _sources(pattern: str) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob(pattern))]


def _cpu_simd() -> str:
    """SIMD level of the CPU ops: $MEGATRON_RL_CPU_SIMD (avx512 | avx2 | none), else the best the
    build machine has (the extension is built where it runs: venv.sh, tools/gpu_check.sh)."""
    forced = os.environ.get("MEGATRON_RL_CPU_SIMD", "").strip().lower()
    if forced:
        if forced not in {"avx512", "avx2", "none"}:
            raise SystemExit(f"MEGATRON_RL_CPU_SIMD must be avx512, avx2 or none, got {forced!r}")
        return forced
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return "none"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "avx2"  # x86-64 without /proc (e.g. macOS): AVX2 + FMA are near universal
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "none"


_SIMD_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "none": [],
}


def _cpu_extension(cpp_extension):
    """The plain C++ extension: csrc/*.cpp, vectorised (at::vec) for the build machine's CPU."""
    simd = _cpu_simd()
    _note(f"building {CPU_EXT} with SIMD level {simd} (MEGATRON_RL_CPU_SIMD to override)")
    return cpp_extension.CppExtension(name=CPU_EXT, sources=_sources("csrc/*.cpp"),
                                      include_dirs=[str(ROOT / "csrc")],
                                      extra_compile_args={"cxx": ["-O3", "-Wno-unknown-pragmas"]
                                                          + _SIMD_FLAGS[simd]})


def _cuda_home_or_why_not(torch) -> tuple[str | None, str | None]:
    """(CUDA_HOME to build the CUDA extension with, or None and why not)."""
    if _flag("MEGATRON_RL_SKIP_CUDA"):
        return None, "MEGATRON_RL_SKIP_CUDA=1"
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return None, "nvcc not found (set CUDA_HOME)"
    return cuda_home, None


def _cuda_extension(cpp_extension, cuda_home: str, torch):
    """The CUDA extension: csrc/cuda/*.cu + *.cpp, for $TORCH_CUDA_ARCH_LIST (default 9.0a)."""
    sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    ext = cpp_extension.CUDAExtension(
        name=CUDA_EXT,
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={  # no -std: torch's BuildExtension adds the one it needs (C++20)
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    ext.include_dirs += _pip_cuda_library_includes(cuda_home)  # after CUDA_HOME's own headers
    _note(f"building {CUDA_EXT} from {len(sources)} sources with {cuda_home}/bin/nvcc, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, torch cu{torch.version.cuda}")
    return ext


def _extensions():
    """Return (ext_modules, build_ext_base, why the CUDA extension is skipped or None)."""
    try:
        import torch
    except Exception as e:  # torch absent (e.g. isolated build env) or broken
        return [], build_ext, f"torch not importable at build time ({type(e).__name__}: {e}); " \
                              "use `pip install --no-build-isolation`"
    cuda_home, why = _cuda_home_or_why_not(torch)
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: point it at our nvcc first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    from torch.utils import cpp_extension

    exts = [_cpu_extension(cpp_extension)]
    if cuda_home is not None:
        exts.append(_cuda_extension(cpp_extension, cuda_home, torch))
    return exts, cpp_extension.BuildExtension, why


EXT_MODULES, _BuildExtBase, SKIP_REASON = _extensions()
if SKIP_REASON:
    _note(f"not building {CUDA_EXT}: {SKIP_REASON}; CUDA tensors use the pure-PyTorch paths")


class OptionalBuildExt(_BuildExtBase):
    """build_ext that turns a failed CUDA compile into a warning unless MEGATRON_RL_REQUIRE_CUDA=1.

    Each extension is built on its own, so a CUDA failure keeps the CPU extension."""

    def _give_up(self, ext, err: BaseException) -> None:
        if ext.name != CUDA_EXT or _flag("MEGATRON_RL_REQUIRE_CUDA"):
            raise err
        bar = "=" * 78
        _note(f"\n{bar}\nWARNING: could not build {CUDA_EXT}: {type(err).__name__}: {err}\n"
              f"Installing without it; CUDA tensors fall back to the pure-PyTorch ops.\n"
              f"Set MEGATRON_RL_REQUIRE_CUDA=1 to make this an error, "
              f"MEGATRON_RL_SKIP_CUDA=1 to skip the attempt.\n{bar}")
        # Drop the extension so later steps (copying outputs, editable wheels) don't look for it.
        self.extensions = [e for e in self.extensions if e is not ext]
        self.distribution.ext_modules = [e for e in self.distribution.ext_modules if e is not ext]

    def build_extensions(self) -> None:
        # torch's BuildExtension checks nvcc/compiler versions in build_extensions(): run it once
        # per extension so that a CUDA refusal does not take the CPU extension down with it.
        for ext in list(self.extensions):
            self.extensions = [ext]
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001
                self._give_up(ext, err)
        self.extensions = list(self.distribution.ext_modules or [])


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
        "pyarrow>=15",  # parquet datasets (data/loader.py)
        "datasets>=2.18",  # HF datasets saved with save_to_disk (data/loader.py)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        "sglang": ["sglang>=0.4.6"],
        "modelopt": ["nvidia-modelopt>=0.27", "requests"],  # modelopt.torch imports requests
        "wandb": ["wandb>=0.17"],  # --wandb-project (train/logging.py)
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "hypothesis>=6.100", "openai>=1.40",
                "accelerate>=1.0",  # transformers' FP8 loader, read in tests/test_fp8_checkpoint.py
                "nvidia-modelopt>=0.27", "requests",  # tests/test_fp8_qat.py (skipped without it)
                "wandb>=0.17"],  # tests/test_logging_wandb.py (offline mode)
    },
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
