"""megatron_rl._optional: backend probes never raise, and Apex detection tells NVIDIA Apex from
PyPI's unrelated `apex` package (faked on sys.path here)."""

import importlib
import subprocess
import sys
import textwrap

import pytest

from megatron_rl import _optional


@pytest.fixture
def clean_apex(monkeypatch, tmp_path):
    """Put tmp_path first on sys.path, hide any real `apex`, and reset the probe caches."""
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    _optional.reset()
    yield tmp_path
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        del sys.modules[name]
    _optional.reset()


def _write(root, rel, text=""):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_unrelated_pypi_apex_is_not_nvidia_apex(clean_apex):
    # PyPI's `apex` (a Pyramid auth toolkit): a package with no NVIDIA subpackages, whose
    # __init__ fails without its own dependencies. The probe must not even run it.
    _write(clean_apex, "apex/__init__.py", "raise ImportError('pyramid is not installed')\n")
    _write(clean_apex, "apex/lib/__init__.py")
    _write(clean_apex, "apex/views.py")
    assert _optional.has_apex() is False
    assert "apex" not in sys.modules
    info = _optional.describe()
    assert info["apex"] is False and "unrelated" in info["apex_error"]


def test_nvidia_apex_layout_is_detected(clean_apex):
    _write(clean_apex, "apex/__init__.py", "FAKE_NVIDIA_APEX = True\n")
    _write(clean_apex, "apex/normalization/__init__.py", "class FusedLayerNorm: pass\n")
    _write(clean_apex, "apex/optimizers/__init__.py", "class FusedAdam: pass\n")
    assert _optional.has_apex() is True
    assert sys.modules["apex"].FAKE_NVIDIA_APEX


def test_nvidia_apex_that_fails_to_import_is_absent(clean_apex):
    _write(clean_apex, "apex/__init__.py", "raise OSError('libcudart.so: cannot open')\n")
    _write(clean_apex, "apex/normalization/__init__.py")
    assert _optional.has_apex() is False
    assert "OSError" in _optional.describe()["apex_error"]


def test_probes_are_cached(clean_apex):
    assert _optional.has_apex() is False
    _write(clean_apex, "apex/__init__.py")
    _write(clean_apex, "apex/transformer/__init__.py")
    importlib.invalidate_caches()
    assert _optional.has_apex() is False  # cached until reset()
    _optional.reset()
    assert _optional.has_apex() is True


def test_describe_is_a_flat_loggable_dict():
    info = _optional.describe()
    for key in ("apex", "te", "sglang", "modelopt", "cuda_ext"):
        assert isinstance(info[key], bool), key
    assert info["torch"] and info["megatron_core"] == "0.19.2"
    assert all(isinstance(v, (bool, str, type(None))) for v in info.values())
    assert (info["cuda_ext_info"] is None) == (not info["cuda_ext"])


def test_import_pulls_in_no_backend():
    # A fresh interpreter: importing the module must import neither torch nor any backend.
    code = ("import sys, megatron_rl; before = set(sys.modules); import megatron_rl._optional; "
            "print(sorted(m for m in ('torch', 'apex', 'transformer_engine', 'sglang', "
            "'modelopt', 'megatron_rl._C', 'megatron_rl._C_cuda') if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not _optional.has_cuda_ext(), reason="megatron_rl._C_cuda not built")
def test_cuda_ext_build_info():
    # the CUDA ops themselves are tested in tests/test_fused_loss.py (GPU-marked)
    assert _optional.cuda_build_info().startswith("megatron_rl._C_cuda: CUDA ")
