"""HF safetensors <-> Megatron-Core dist checkpoint (model only), any TP / PP / EP / ETP layout.

    python tools/convert.py hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N --etp N]
                                        [--overwrite]
    python tools/convert.py mcore-to-hf --ckpt DIR --out DIR [--hf-config DIR] [--tp ...]
                                        [--overwrite] [--max-shard-size 5GB] [--fused-experts]
                                        [--fp8 block128]

Run as one process (then the layout flags must be 1) or under torchrun with the world size a
multiple of the layout: every rank builds and holds only its shard, so memory is split.
hf-to-mcore: ``checkpoint.load_hf_weights`` (lazy, this rank's tensors) ->
``checkpoint.mcore_io.save_model_checkpoint`` (HF config in the common state, config.json and
tokenizer files copied to ``<out>/hf_meta/``). mcore-to-hf: ``load_model_checkpoint`` ->
``checkpoint.export.iter_hf_tensors`` (streamed to rank 0) -> ``model-0000i-of-0000n.safetensors``
(each at most --max-shard-size, except a single larger tensor) + ``model.safetensors.index.json``
+ config.json / tokenizer files from --hf-config or ``<ckpt>/hf_meta``.
Both write into ``<out>.tmp-<pid>`` and rename when complete; an existing non-empty --out is
refused unless --overwrite; a failure removes the temp dir, and the temp dirs of killed runs
(their pid dead on this host) are removed by the next run. Parameters are built without
initialisation and every one then takes its own tensor's dtype (HF safetensors -> dist
checkpoint -> HF), so conversion is lossless: bf16, fp32 and mixed-dtype checkpoints come back
byte-identical; a parameter fused from HF tensors of different dtypes (e.g. a bf16 q_proj with
an fp32 k_proj) is refused, naming them, rather than cast.
``--fp8 block128``: the Linear weights ``quant.fp8.FP8_RULES`` selects are written as float8_e4m3fn +
``weight_scale_inv`` per 128x128 block, and config.json gets the DeepSeek-V3 / SGLang
``quantization_config`` (``quant.fp8.quantization_config``).
Left out: virtual pipeline stages, reading FP8 checkpoints in hf-to-mcore.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """"5GB" -> 5_000_000_000 (HF convention: KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB, 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _hf_dtype(hf_dir: str):
    """The dtype holding most of the HF checkpoint's bytes: the model's ``params_dtype``
    (every parameter then takes its own tensor's dtype, ``load_hf_weights(keep_dtype=True)``)."""
    from collections import Counter

    from megatron_rl.checkpoint.safetensors_io import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(hf_dir)
    size = Counter()
    for k in ckpt.keys():
        m = ckpt.meta(k)
        size[m.dtype] += m.numel() * m.element_size()
    return max(sorted(size, key=str), key=size.__getitem__)


def _setup(args, hf_config: dict, dtype):
    """init_parallel for the layout flags + this rank's model chunk (uninitialised params)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_rl.models import (ModelOptions, build_model, get_family,
                                    transformer_config_from_hf)
    from megatron_rl.parallel import ParallelConfig, init_parallel

    get_family(hf_config)  # unsupported architecture -> ValueError listing FAMILIES
    if ps.model_parallel_is_initialized():
        raise RuntimeError("tools/convert.py: Megatron's parallel state is already initialised "
                           "(destroy it first: the layout comes from --tp/--pp/--ep/--etp)")
    pc = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    owned = not torch.distributed.is_initialized()
    try:
        init_parallel(pc, device="cpu")
    except ValueError as e:
        raise ValueError(f"layout --tp {pc.tp} --pp {pc.pp} --ep {pc.ep} --etp {pc.etp}: {e}; "
                         f"run one process with all layout flags 1, or torchrun with "
                         f"--nproc-per-node a multiple of tp*pp (and of ep*etp per stage)") from e
    opts = ModelOptions(params_dtype=dtype, overrides={"perform_initialization": False})
    cfg = transformer_config_from_hf(hf_config, opts, tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
    model = build_model(hf_config, cfg, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage())
    return model, owned


def _teardown(owned: bool) -> None:
    from megatron_rl.parallel import destroy_parallel

    destroy_parallel(keep_process_group=not owned)


def _on_all_ranks(fn, *args):
    """Run ``fn(*args)`` on every rank; if it raised on any rank, raise on all of them (so no
    rank walks into the next collective alone and hangs)."""
    import torch

    err = None
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised below
        err = e
    msgs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(msgs, None if err is None else str(err))
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, m = failed[0]
        raise RuntimeError(f"rank {r} failed: {m}")


def hf_to_mcore(args) -> str:
    """HF dir -> model-only dist checkpoint. Collective when run under torchrun."""
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.checkpoint.mcore_io import check_out_dir, save_model_checkpoint
    from megatron_rl.models import load_hf_config

    check_out_dir(os.path.abspath(args.out), args.overwrite)
    hf_config = load_hf_config(args.hf)
    model, owned = _setup(args, hf_config, _hf_dtype(args.hf))
    try:
        _on_all_ranks(lambda: load_hf_weights(model, args.hf, hf_config, keep_dtype=True))
        return save_model_checkpoint(model, args.out, hf_config, overwrite=args.overwrite,
                                     hf_meta_from=args.hf)
    finally:
        _teardown(owned)


def write_hf_shards(buckets, out_dir: str, max_shard_bytes: int) -> dict:
    """Write streamed ``{name: tensor}`` buckets as HF shards + index into ``out_dir``.

    Shards hold at most ``max_shard_bytes`` (a single larger tensor gets its own); named
    ``model-0000i-of-0000n.safetensors`` once n is known. Returns the index dict."""
    from safetensors.torch import save_file

    parts, shard, size, total = [], {}, 0, 0

    def flush():
        fn = f"model-{len(parts) + 1:05d}.part"
        save_file(shard, os.path.join(out_dir, fn), metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, fn), 0o644)  # safetensors creates owner-only files
        parts.append((fn, list(shard)))

    for bucket in buckets:
        for name, t in bucket.items():
            n = t.numel() * t.element_size()
            if shard and size + n > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = t.detach().cpu().contiguous()
            size += n
            total += n
    if shard or not parts:
        flush()
    weight_map = {}
    for i, (fn, names) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(out_dir, fn), os.path.join(out_dir, final))
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return index


def mcore_to_hf(args) -> str:
    """Model-only (or training) dist checkpoint -> HF dir. Collective under torchrun."""
    import torch

    from megatron_rl.checkpoint.export import iter_hf_tensors
    from megatron_rl.checkpoint.mcore_io import (HF_META, OWNER, check_out_dir, copy_hf_meta,
                                                 load_model_checkpoint, make_tmp_dir, read_hf_config,
                                                 read_params_dtype, replace_dir)
    from megatron_rl.models import load_hf_config

    out = os.path.abspath(args.out)
    check_out_dir(out, args.overwrite)
    max_shard = parse_size(args.max_shard_size)
    meta_dir = args.hf_config or os.path.join(args.ckpt, HF_META)
    hf_config = load_hf_config(args.hf_config) if args.hf_config else read_hf_config(args.ckpt)
    if hf_config is None:
        raise ValueError(f"{args.ckpt} stores no HF config (not written by hf-to-mcore?); "
                         f"pass --hf-config DIR")
    model, owned = _setup(args, hf_config, read_params_dtype(args.ckpt))
    try:
        load_model_checkpoint(model, args.ckpt, keep_dtype=True)
        buckets = iter_hf_tensors(model, hf_config, fused_experts=args.fused_experts,
                                  bucket_bytes=min(max_shard, 512 * 2**20))
        ndims: dict[str, int] = {}
        if getattr(args, "fp8", None):
            buckets = _fp8_buckets(buckets, ndims)
        if torch.distributed.get_rank() != 0:
            for _ in buckets:
                pass
        else:
            tmp = make_tmp_dir(out, os.getpid())
            try:
                write_hf_shards(buckets, tmp, max_shard)
                copied = copy_hf_meta(meta_dir, tmp) if os.path.isdir(meta_dir) else []
                if "config.json" not in copied or ndims:
                    _write_config(tmp, hf_config, ndims)
                os.remove(os.path.join(tmp, OWNER))  # complete: the HF dir gets no extra file
                replace_dir(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        torch.distributed.barrier()
    finally:
        _teardown(owned)
    return out


def _fp8_buckets(buckets, ndims: dict):
    """Quantise each bucket (weight and scale stay together); records {hf_name: ndim}."""
    from megatron_rl.quant.fp8 import quantize_named

    for bucket in buckets:
        ndims.update({k: t.dim() for k, t in bucket.items()})
        yield quantize_named(bucket)


def _write_config(out_dir: str, hf_config: dict, ndims: dict) -> None:
    """config.json = the copied one (else ``hf_config``), plus the FP8 ``quantization_config``
    when tensors were quantised (``ndims`` non-empty)."""
    from megatron_rl.quant.fp8 import quantization_config

    path = os.path.join(out_dir, "config.json")
    cfg = hf_config
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
    if ndims:
        cfg = {**cfg, "quantization_config": quantization_config(ndims)}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF checkpoint dir (config.json + safetensors)")
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="dist checkpoint dir")
    b.add_argument("--hf-config", default=None,
                   help="HF dir whose config.json / tokenizer are used (default: <ckpt>/hf_meta)")
    b.add_argument("--max-shard-size", default="5GB", help="max bytes per shard (5GB, 500MB)")
    b.add_argument("--fused-experts", action="store_true",
                   help="write transformers' stacked expert tensors instead of per-expert ones")
    b.add_argument("--fp8", choices=["block128"], default=None,
                   help="write Linear weights as float8_e4m3fn + weight_scale_inv per 128x128 "
                        "block (DeepSeek-V3 / SGLang fp8 format)")
    for s in (a, b):
        s.add_argument("--out", required=True, help="output dir (written atomically)")
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        for flag in ("tp", "pp", "ep"):
            s.add_argument(f"--{flag}", type=int, default=1, help=f"{flag} size of the layout")
        s.add_argument("--etp", type=int, default=None, help="expert TP size (default: --tp)")
    return p


def main(argv: list[str] | None = None) -> str:
    """Run one subcommand; returns the output dir. Raises on error (see the module doc)."""
    args = build_parser().parse_args(argv)
    return (hf_to_mcore if args.cmd == "hf-to-mcore" else mcore_to_hf)(args)


if __name__ == "__main__":
    try:
        print(main())
    except (ValueError, OSError) as e:  # CheckpointError, FileExistsError, ... : no traceback
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(2)
