#!/usr/bin/env bash
# Create the project's Python 3.12 venv if it is missing and install megatron_rl[dev] into it
# (editable), compiling csrc/ (the CPU ops always; the CUDA ops where nvcc + a CUDA torch exist).
# Idempotent: a second run returns at once unless setup.py / pyproject.toml / csrc/ changed.
#
#   bash scripts/venv.sh          # create / update
#   source scripts/venv.sh        # same, then activate it in this shell
#
# Environment:
#   PYTHON                  interpreter to build the venv with (else: python3.12 if it runs,
#                           pyenv's 3.12.x, ~/.pyenv/versions/3.12*, /usr/bin/python3.12)
#   MEGATRON_RL_VENV        venv directory (default: <repo>/.venv)
#   MEGATRON_RL_TORCH       pip spec for torch when the venv has none (default: torch==2.15.0)
#   MEGATRON_RL_EXTRAS      extras to install (default: dev; e.g. "dev,te")
#   MEGATRON_RL_SKIP_CUDA   0 (default): compile the CUDA ops where nvcc exists; 1 = CPU ops only
# Left out: conda, uv, and installing CUDA itself.

_mrl_venv_main() {
  set -euo pipefail
  local repo venv stamp key py torch_spec extras skip_cuda
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${MEGATRON_RL_VENV:-$repo/.venv}"
  torch_spec="${MEGATRON_RL_TORCH:-torch==2.15.0}"
  extras="${MEGATRON_RL_EXTRAS:-dev}"
  skip_cuda="${MEGATRON_RL_SKIP_CUDA:-0}"
  stamp="$venv/.megatron_rl.stamp"
  log() { echo "[venv.sh] $*" >&2; }

  is_py312() {  # runs, is >= 3.12, and can make a venv with pip
    [ -n "$1" ] && "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' \
      >/dev/null 2>&1
  }

  find_python() {
    local c v
    for c in "${PYTHON:-}" python3.12; do
      if is_py312 "$c"; then command -v "$c" || echo "$c"; return 0; fi
    done
    if command -v pyenv >/dev/null 2>&1; then
      for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -rV); do
        c="$(pyenv prefix "$v" 2>/dev/null)/bin/python3.12"
        if is_py312 "$c"; then echo "$c"; return 0; fi
      done
    fi
    for c in $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV) \
             /usr/bin/python3.12 /usr/local/bin/python3.12; do
      if is_py312 "$c"; then echo "$c"; return 0; fi
    done
    return 1
  }

  # What the install depends on: a change to any of these re-runs pip.
  key="$( {
    echo "repo=$repo extras=$extras skip_cuda=$skip_cuda torch=$torch_spec simd=${MEGATRON_RL_CPU_SIMD:-}"
    cat "$repo/setup.py" "$repo/pyproject.toml" 2>/dev/null
    if [ -d "$repo/csrc" ]; then
      find "$repo/csrc" -type f \( -name '*.cu' -o -name '*.cpp' -o -name '*.h' -o -name '*.cuh' \) \
        -print0 | sort -z | xargs -0r cat
    fi
  } | sha256sum | cut -d' ' -f1 )"

  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] \
     && "$venv/bin/python" -c 'import megatron_rl' >/dev/null 2>&1; then
    return 0  # up to date
  fi

  # One installer at a time (parallel CI jobs, or a test run started during a build).
  if command -v flock >/dev/null 2>&1; then
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    flock 9
  fi

  # A venv whose interpreter no longer runs (moved, or its Python was removed) is rebuilt.
  if [ -e "$venv" ] && ! is_py312 "$venv/bin/python"; then
    log "$venv is broken or not Python >= 3.12; recreating it"
    rm -rf "$venv"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if ! py="$(find_python)"; then
      log "ERROR: no working Python >= 3.12 found. Tried \$PYTHON, python3.12, pyenv 3.12.x," \
          "~/.pyenv/versions/3.12*, /usr/bin/python3.12. Install one (e.g. 'pyenv install 3.12'" \
          "or Debian's python3.12 + python3.12-venv) or set PYTHON=/path/to/python3.12."
      return 1
    fi
    log "creating $venv with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
    "$py" -m venv "$venv"
  fi

  pip_install() {  # quiet, minus the warnings some pip.conf file:// indexes print per package
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
      2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  }
  "$venv/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' \
    >/dev/null 2>&1 || pip_install "setuptools>=64" wheel
  if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    log "installing $torch_spec (first time: a few GB of CUDA wheels)"
    pip_install "$torch_spec"
  fi
  if ! "$venv/bin/python" -c 'import ninja' >/dev/null 2>&1 && ! command -v ninja >/dev/null 2>&1; then
    pip_install ninja  # parallel compiles; without it the extensions compile one file at a time
  fi
  log "installing megatron_rl[$extras] (editable, MEGATRON_RL_SKIP_CUDA=$skip_cuda)"
  # venv/bin on PATH: torch's cpp_extension looks for the `ninja` executable there
  PATH="$venv/bin:$PATH" MEGATRON_RL_SKIP_CUDA="$skip_cuda" pip_install --no-build-isolation -e "$repo[$extras]"
  if [ "$skip_cuda" != 1 ] && ! "$venv/bin/python" -c \
      'import sys; from megatron_rl._optional import has_cuda_ext; sys.exit(not has_cuda_ext())'; then
    log "WARNING: megatron_rl._C_cuda was not built (tests/test_fused_loss.py fails where nvcc" \
        "exists); rerun with 'pip install -v' to see why"
  fi
  echo "$key" > "$stamp"
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then  # sourced: keep the caller's shell options
  if (_mrl_venv_main); then
    # shellcheck disable=SC1091
    source "${MEGATRON_RL_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}/bin/activate"
    unset -f _mrl_venv_main
  else
    unset -f _mrl_venv_main
    return 1
  fi
else
  _mrl_venv_main
fi
