"""Command line + YAML for the config tree (``megatron_rl.config``): parse, print, save, compare.

    python -m megatron_rl.train.grpo --config run.yaml --lr 2e-6      # the file, then the flags
    python -m megatron_rl.train.grpo --config run.yaml --print-config  # resolved YAML, exit 0

Library: ``transformers.HfArgumentParser`` (a dependency already). It turns each dataclass field into
an argparse flag from its type (``Literal`` -> choices, ``bool`` -> ``--flag [true|false]`` plus
``--no-flag`` for True defaults, ``X | None``), with ``metadata["help"]`` / ``["aliases"]``, and it
*is* an ``argparse.ArgumentParser``: ``p.error`` (exit status 2, message naming the flag), ``--help``
and every existing caller keep working. tyro / simple-parsing / jsonargparse would add a package and
nest flags as ``--section.field`` (Megatron's flags are flat); Megatron's own ``ArgumentGroupFactory``
(``megatron.training.argument_utils``) is internal, recent and has no aliases ("TODO: support arg
renames"). We add on top (``ConfigParser``): flags required after the file is merged, repeatable
list flags, extra ``--no-*`` spellings, and the YAML file with typed, key-named errors.

YAML format: nested by section (``parallel: {tensor_model_parallel_size: 2}``, as ``--print-config``
writes it) or flat (``tensor_model_parallel_size: 2``); keys are field names (``-`` is read as
``_``). An unknown key, a section this entry point does not have, or a value of the wrong type is an
error naming the key and the file. Precedence: field default < files (``--config`` is repeatable,
in order) < command line (a list flag given on the command line replaces the file's list).

Saved copies: ``<out>/config.yaml`` (``record_run_config``) and ``config.yaml`` in every checkpoint
(``checkpointing.save_checkpoint(config=...)``, listed in its MANIFEST.json). A resumed run warns
(rank 0, ``ConfigChangedWarning``) naming each field that differs from the checkpoint's config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
import warnings
from typing import Literal, Union

import yaml
from transformers import HfArgumentParser

from megatron_rl.config import section_name

_CUSTOM = ("required", "repeatable", "negative_aliases", "type_fn")
# run-control fields a resumed run is expected to change: not reported
NOT_COMPARED = frozenset({"stop_after_steps", "no_resume", "resume_fallback", "override_opt_param_scheduler",
                          "use_checkpoint_opt_param_scheduler"})
CONFIG_FILE = "config.yaml"


class ConfigChangedWarning(UserWarning):
    """A resumed run's config differs from the one its checkpoint was trained with."""


def flag_names(f: dataclasses.Field) -> list[str]:
    """Command-line spellings of a field: ``--name-with-dashes`` first, then its aliases."""
    return [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]


def add_section_args(parser, dtype: type) -> None:
    """Add one section's flags to an argparse parser (an argument group named after the section).

    Works on any ``argparse.ArgumentParser`` (``quant.fp8_training.add_fp8_args`` uses it on a
    plain one); the flag conversion is HfArgumentParser's, plus our extra metadata keys."""
    group = parser.add_argument_group(dtype._argument_group_name)
    hints = typing.get_type_hints(dtype)
    for f in dataclasses.fields(dtype):
        meta = dict(f.metadata)
        custom = {k: meta.pop(k) for k in _CUSTOM if k in meta}
        if custom.get("repeatable"):
            group.add_argument(*flag_names(f), f"--{f.name}", dest=f.name, action="append", default=None,
                               help=meta["help"])
            continue
        g = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)
        g.name, g.type = f.name, hints[f.name]
        HfArgumentParser._parse_dataclass_field(group, g)
        action = next(a for a in group._group_actions if a.dest == f.name)
        action.option_strings.sort(key=lambda o: "_" in o)  # --megatron-spelling first (usage, errors)
        if "type_fn" in custom:
            action.type = custom["type_fn"]
        if custom.get("negative_aliases"):
            group.add_argument(*custom["negative_aliases"], dest=f.name, action="store_false",
                               default=f.default, help=f"= --no-{f.name.replace('_', '-')}")


class ConfigParser(HfArgumentParser):
    """An ``argparse.ArgumentParser`` over the sections ``tree`` plus ``--config`` / ``--print-config``.

    Use ``parse_config`` (not ``parse_args``) to get the file merged and the required flags checked."""

    def __init__(self, tree: tuple[type, ...], **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # as Megatron: a typo is an error, not a prefix match
        super().__init__(list(tree), **kwargs)
        self.tree = tuple(tree)
        g = self.add_argument_group("run configuration file")
        g.add_argument("--config", action="append", default=None, metavar="RUN.yaml",
                       help="YAML run config (nested by section or flat; keys are field names); repeatable "
                            "(a later file overrides an earlier one); flags override the files")
        g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    def _add_dataclass_arguments(self, dtype):  # HfArgumentParser's hook, with our metadata keys
        add_section_args(self, dtype)


def tree_fields(tree) -> dict[str, tuple[type, dataclasses.Field]]:
    """field name -> (section dataclass, field), over the sections of ``tree``."""
    return {f.name: (d, f) for d in tree for f in dataclasses.fields(d)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value, tp, where: str, choices=None):
    """Check / convert one YAML value to the field type ``tp``; ``ValueError`` naming ``where``.

    Accepted: the type itself; an int for a float; a numeric string for a number (YAML 1.1 reads
    ``1e-4`` as a string); a single string for a list of strings; None where the type allows it."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in targs:
            return None
        return coerce(value, next(a for a in targs if a is not type(None)), where, choices)
    if value is None:
        raise bad
    if origin is Literal or choices:
        allowed = targs if origin is Literal else tuple(choices)
        if value not in allowed:
            raise ValueError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise bad
        return [coerce(v, targs[0], f"{where}[{i}]") for i, v in enumerate(items)]
    if tp is bool or isinstance(value, bool):
        if tp is bool and isinstance(value, bool):
            return value
        raise bad
    if tp in (int, float) and isinstance(value, str):
        try:
            value = tp(value)
        except ValueError:
            raise bad from None
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise bad
    return value


def load_config_file(path: str, tree) -> dict:
    """Read a run YAML into ``{field: value}`` (typed). Raises ValueError naming the file and key."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections / fields, got {type(data).__name__}")
    known = tree_fields(tree)
    sections = {section_name(d): d for d in tree}
    flat: dict = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in sections and value is None:  # an empty section ("rl:" with nothing under it)
            continue
        if key in sections and isinstance(value, dict):
            for k, v in value.items():
                k = str(k).replace("-", "_")
                if k not in known or known[k][0] is not sections[key]:
                    raise ValueError(f"{path}: unknown key '{key}.{k}'{_hint(k, known, tree)}")
                flat[k] = v
        elif key in known:
            flat[key] = value
        else:
            raise ValueError(f"{path}: unknown key '{key}'{_hint(key, known, tree)}")
    hints = {d: typing.get_type_hints(d) for d in tree}
    out = {}
    for k, v in flat.items():
        d, f = known[k]
        type_fn = f.metadata.get("type_fn")
        try:
            v = type_fn(v) if type_fn and isinstance(v, str) else v
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{path}: key '{section_name(d)}.{k}': {e}") from None
        out[k] = coerce(v, hints[d][k], f"{path}: key '{section_name(d)}.{k}'", f.metadata.get("choices"))
    return out


def _hint(key: str, known: dict, tree) -> str:
    from megatron_rl.config import ALL_SECTIONS

    if key in known:
        return f" (it belongs to section '{section_name(known[key][0])}')"
    for d, f in known.values():
        if f"--{key.replace('_', '-')}" in f.metadata.get("aliases", ()):
            return f" (a flag alias; the key is '{f.name}')"
    other = [section_name(d) for d in ALL_SECTIONS if d not in tree
             and (key == section_name(d) or key in {f.name for f in dataclasses.fields(d)})]
    if other:
        return f" (section '{other[0]}' is not used by this entry point)"
    return ""


def _config_paths(argv) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", action="append", default=[])
    return pre.parse_known_args(argv)[0].config


def parse_config(p: ConfigParser, argv=None) -> argparse.Namespace:
    """Defaults < ``--config`` files (in order) < command line, into one flat namespace (a field per
    attribute).

    Exits through ``p.error`` (status 2) naming the key / file / flag: a bad file, a missing
    required flag (given neither in the file nor on the command line)."""
    known = tree_fields(p.tree)
    file_values = {}
    for path in _config_paths(argv):
        try:
            file_values.update(load_config_file(path, p.tree))
        except ValueError as e:
            p.error(str(e))
    repeat = {k for k, (_, f) in known.items() if f.metadata.get("repeatable")}
    p.set_defaults(**{k: v for k, v in file_values.items() if k not in repeat})
    args = p.parse_args(argv)
    for k in repeat:
        if getattr(args, k) is None:
            setattr(args, k, list(file_values.get(k, known[k][1].default_factory())))
    missing = [flag_names(f)[0] for k, (_, f) in known.items()
               if f.metadata.get("required") and getattr(args, k) is None]
    if missing:
        p.error("the following arguments are required: " + ", ".join(missing))
    return args


def resolved_config(args: argparse.Namespace, tree) -> dict:
    """``{section: {field: value}}`` of the tree read from ``args`` (after validation / defaults)."""
    return {section_name(d): {f.name: _plain(getattr(args, f.name)) for f in dataclasses.fields(d)} for d in tree}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def config_to_yaml(cfg: dict) -> str:
    """The nested config as YAML (section order and field order of the tree)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def finish_config(p: ConfigParser, args: argparse.Namespace) -> None:
    """After validation: ``args.run_config`` = the resolved config; ``--print-config`` prints it and
    exits 0; then ``args.save`` (None: <out>/checkpoints) and ``args.load`` (None: --save) are filled."""
    args.run_config = resolved_config(args, p.tree)
    if args.print_config:
        print(config_to_yaml(args.run_config), end="", flush=True)
        raise SystemExit(0)
    if args.save is None:
        args.save = os.path.join(args.out, "checkpoints")
    if args.load is None:
        args.load = args.save


def write_config_yaml(path: str, cfg: dict) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (temp file + rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(config_to_yaml(cfg))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _flatten(cfg: dict) -> dict:
    return {f"{s}.{k}": v for s, sec in cfg.items() if isinstance(sec, dict) for k, v in sec.items()}


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(section.field, old, new)]`` for every field whose value differs (a field missing on one
    side reads as ``<absent>``), run-control fields (``NOT_COMPARED``) left out."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        if key.split(".", 1)[1] in NOT_COMPARED:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append((key, va, vb))
    return out


def warn_config_changes(old: dict, new: dict, source: str) -> list[tuple[str, object, object]]:
    """Warn (``ConfigChangedWarning``) naming each changed field, old and new value; returns them."""
    changes = config_changes(old, new)
    if changes:
        lines = "\n".join(f"  {k}: {va!r} -> {vb!r}" for k, va, vb in changes)
        warnings.warn(f"resuming with a config that differs from {source} in {len(changes)} field(s):\n{lines}",
                      ConfigChangedWarning, stacklevel=2)
    return changes


def record_run_config(args: argparse.Namespace, *, is_rank0: bool) -> None:
    """Rank 0, before the checkpoint is loaded: unless ``--no-resume``, warn about every field that
    differs from the config of the checkpoint ``--load`` points to (its ``config.yaml``, when it has
    one), then write the resolved config to ``<out>/config.yaml``. Other ranks: nothing.

    Before the load, so the warning is printed even when the load itself then fails (Megatron's
    DistributedOptimizer cannot load its state under a different ``--lr``). Raises ValueError for
    a corrupt checkpoint pointer (as ``load_checkpoint`` would)."""
    if not is_rank0:
        return
    if not args.no_resume:
        from megatron_rl.train.checkpointing import latest_step

        step = latest_step(args.load)
        saved = None if step is None else os.path.join(args.load, f"iter_{step:07d}", CONFIG_FILE)
        if saved is not None and os.path.isfile(saved):
            try:
                with open(saved) as fh:
                    old = yaml.safe_load(fh) or {}
            except (OSError, yaml.YAMLError) as e:  # a damaged checkpoint: the load reports it
                warnings.warn(f"{saved}: unreadable ({e}); config not compared", ConfigChangedWarning, stacklevel=2)
            else:
                warn_config_changes(old, args.run_config, saved)
    os.makedirs(args.out, exist_ok=True)
    write_config_yaml(os.path.join(args.out, CONFIG_FILE), args.run_config)
