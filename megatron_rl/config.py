"""The run configuration tree: one typed dataclass per section, each field declared once.

    model      HF checkpoint, device, precision, activation recompute
    moe        Megatron's --moe-* router / dispatcher flags
    fp8        Transformer Engine / FP8 training (quant.fp8_training)
    parallel   tp / pp / ep / etp / cp / sequence parallel
    optimizer  Adam + LR schedule + grad clip
    training   micro-batch, seed, eval interval, stop-after (both loops)
    checkpoint run dir, --save / --load, save interval, resume
    data       datasets, key mapping, verifier
    logging    Weights & Biases (Megatron's --wandb-* names)
    sft        SFT-only: sequence length, global batch, train iterations, evals, HF export
    rl         GRPO-family RL: ``train.rl_config.RLConfig``'s fields (declared there, not here)
    rollout    engines, multi-turn environments, FP8 rollouts / QAT

A field's name is its YAML key and its flag (``--tensor-model-parallel-size``: Megatron's own
spelling for everything Megatron owns, checked against Megatron-LM ``megatron/training/arguments.py``
and ``megatron/training/config/training_config.py``); ``metadata["aliases"]`` are the short
spellings kept for old command lines (``--tp``, ``--lr-warmup-steps``, ``--train-steps``, ...).
Parsing, ``--config run.yaml``, ``--print-config``, the saved ``config.yaml`` and the resume diff
live in ``train.run_config``; the README's "Run configuration" section is generated from this file
(``tools/gen_config_docs.py``).

Metadata keys besides argparse's (``help``, ``aliases``, ``choices``): ``required`` (checked after
the YAML file and the command line are merged, so a file may supply it), ``repeatable`` (a list
given as ``--flag A --flag B``), ``negative_aliases`` (extra spellings of ``--no-<flag>``),
``type_fn`` (parses the command-line string, e.g. ``none`` -> None).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, get_args

from megatron_rl.train.rl_config import KL_KINDS, LBL_MODES, REPLAY_MODES, RLConfig

FP8Format = Literal["e4m3", "hybrid"]
FP8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
TransformerImpl = Literal["transformer_engine", "local"]
FP8_FORMATS, FP8_RECIPES, TRANSFORMER_IMPLS = get_args(FP8Format), get_args(FP8Recipe), get_args(TransformerImpl)


def arg(default=dataclasses.MISSING, help: str = "", *, factory=None, **meta):  # noqa: A002 - argparse's name
    """A dataclass field carrying its CLI help and extra metadata (see the module docstring)."""
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _recompute(value: str) -> str | None:
    """--recompute-granularity / --recompute value: 'full', or 'none' (= off, our old spelling)."""
    if value == "none":
        return None
    if value != "full":
        import argparse

        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from 'full', 'none'; "
                                         "Megatron's 'selective' is not implemented)")
    return value


@dataclass(kw_only=True)
class ModelArgs:
    _argument_group_name = "model"
    hf: str | None = arg(None, "HF checkpoint dir (config.json, tokenizer, weights) the run starts from",
                         required=True)
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "auto: cuda when available, else cpu")
    bf16: bool = arg(False, "bf16 parameters (GPU); the CPU default is fp32")
    recompute_granularity: str | None = arg(
        None, "activation recompute: 'full' recomputes every layer in the backward (Megatron's "
        "uniform method, 1 layer per chunk); 'none' or unset: off", aliases=["--recompute"], type_fn=_recompute)
    recompute_method: Literal["uniform"] | None = arg(
        None, "Megatron's recompute method; only 'uniform' (with 1 layer per chunk) is implemented")
    recompute_num_layers: int | None = arg(None, "Megatron's layers per recompute chunk; only 1 is implemented")


@dataclass(kw_only=True)
class MoEArgs:
    _argument_group_name = "moe"
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = arg("alltoall", "expert token dispatcher")
    moe_aux_loss_coeff: float = arg(0.0, "Megatron's per-micro-batch load-balancing loss coefficient "
                                         "(RL: use --lbl-mode / --lbl-alpha instead, not both)")
    moe_z_loss_coeff: float | None = arg(None, "router z-loss coefficient (None: off)")


@dataclass(kw_only=True)
class FP8Args:
    _argument_group_name = "fp8 / transformer engine"
    transformer_impl: TransformerImpl | None = arg(
        None, "layer spec (None: transformer_engine when TE imports on CUDA, else local)")
    fp8_format: FP8Format | None = arg(
        None, "FP8 training through Transformer Engine (needs --transformer-impl transformer_engine; None: off)")
    fp8_recipe: FP8Recipe = arg("delayed", "FP8 scaling recipe")
    moe_grouped_gemm: bool = arg(False, "TE grouped-GEMM experts (TEGroupedMLP)")
    first_last_layers_bf16: bool = arg(False, "keep the first/last layers in bf16 under FP8")
    num_layers_at_start_in_bf16: int = arg(1, "with --first-last-layers-bf16")
    num_layers_at_end_in_bf16: int = arg(1, "with --first-last-layers-bf16")


@dataclass(kw_only=True)
class ParallelArgs:
    _argument_group_name = "parallel"
    tensor_model_parallel_size: int = arg(1, "tensor parallel size (tp)", aliases=["--tp"])
    pipeline_model_parallel_size: int = arg(1, "pipeline parallel size (pp)", aliases=["--pp"])
    expert_model_parallel_size: int = arg(1, "expert parallel size (ep)", aliases=["--ep"])
    expert_tensor_parallel_size: int | None = arg(None, "expert tensor parallel size (etp; None: = tp)",
                                                  aliases=["--etp"])
    context_parallel_size: int = arg(1, "context parallel size (cp)", aliases=["--cp"])
    sequence_parallel: bool = arg(False, "Megatron sequence parallelism (with tp > 1)")


@dataclass(kw_only=True)
class OptimizerArgs:
    _argument_group_name = "optimizer"
    lr: float = arg(1e-3, "peak learning rate (Adam)")
    min_lr: float | None = arg(None, "floor of the decay (None: 0.1 x --lr); must be <= --lr")
    lr_warmup_iters: int = arg(10, "linear warmup, in optimizer steps", aliases=["--lr-warmup-steps"])
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = arg(
        "cosine", "decay after the warmup (Megatron's OptimizerParamScheduler)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    clip_grad: float = arg(1.0, "gradient-norm clip (0: off)")
    use_distributed_optimizer: bool = arg(True, "Megatron's DistributedOptimizer (optimizer state sharded over dp)",
                                          negative_aliases=["--no-distributed-optimizer"])
    override_opt_param_scheduler: bool = arg(
        False, "on resume, use this run's lr / min_lr / warmup / decay / weight-decay schedule instead of the "
        "checkpoint's (without this or --use-checkpoint-opt_param-scheduler a changed schedule is refused)",
        aliases=["--override-opt_param-scheduler"])
    use_checkpoint_opt_param_scheduler: bool = arg(
        False, "on resume, keep the checkpoint's lr / min_lr / warmup / decay / weight-decay schedule and "
        "ignore this run's", aliases=["--use-checkpoint-opt_param-scheduler"])


@dataclass(kw_only=True)
class TrainingArgs:
    _argument_group_name = "training"
    micro_batch_size: int = arg(4, "rows per micro-batch per data-parallel rank")
    seed: int = arg(1234, "random seed (data order, sampling, init)")
    eval_interval: int = arg(0, "steps between evals (0: only before and after)")
    stop_after_steps: int = arg(0, "exit after this many steps in this process, without a final checkpoint "
                                   "(simulates a kill; to test resume; 0: off)")


@dataclass(kw_only=True)
class CheckpointArgs:
    _argument_group_name = "checkpoint"
    out: str | None = arg(None, "run directory: metrics.jsonl, TensorBoard, config.yaml, engine logs",
                          required=True)
    save: str | None = arg(None, "checkpoint directory written to (None: <out>/checkpoints)")
    load: str | None = arg(None, "checkpoint directory resumed from (None: = --save)")
    save_interval: int = arg(0, "steps between checkpoints (0: only at the end)")
    no_resume: bool = arg(False, "start fresh even if --load holds a checkpoint")
    resume_fallback: bool = arg(False, "if the latest checkpoint fails its manifest check, resume from the "
                                       "newest intact one")


@dataclass(kw_only=True)
class DataArgs:
    _argument_group_name = "data"
    train_data: str | None = arg(None, "training data: jsonl (SFT: chat rows; RL: prompts with a label)",
                                 required=True)
    eval_data: list[str] = arg(help="NAME=PATH eval split, repeatable (YAML: a list)", factory=list,
                               repeatable=True)
    input_key: str = arg("messages", "row field holding the chat messages, or a plain prompt string")
    label_key: str = arg("label", "row field holding the verifier's label (expected answer)")
    solution_key: str = arg("solution", "row field holding a worked solution (HPT's SFT target)")
    verifier: str = arg("synthetic", "reward function: synthetic | math | module:callable")


@dataclass(kw_only=True)
class LoggingArgs:
    _argument_group_name = "logging"
    wandb_project: str | None = arg(None, "Weights & Biases project (None: W&B off)")
    wandb_exp_name: str | None = arg(None, "W&B run name (None: W&B's own)")
    wandb_entity: str | None = arg(None, "W&B entity (team or user; None: the default one)")
    wandb_save_dir: str | None = arg(None, "W&B local files (None: <out>/wandb)")


@dataclass(kw_only=True)
class SFTArgs:
    _argument_group_name = "sft"
    seq_length: int = arg(256, "packed row length in tokens")
    global_batch_size: int = arg(16, "packed rows per optimizer step")
    train_iters: int = arg(100, "optimizer steps", aliases=["--train-steps"])
    no_require_label: bool = arg(False, "accept training rows without a label (plain chat SFT data)")
    eval_samples: int = arg(100, "eval rows per split (greedy generation + verifier)")
    eval_max_new_tokens: int = arg(96, "generation budget of the evals")
    save_hf: str | None = arg(None, "write the final weights as an HF checkpoint to this dir")


@dataclass(kw_only=True)
class RolloutArgs:
    _argument_group_name = "rollout"
    num_engines: int = arg(2, "rollout engines (data-parallel inference servers)")
    engine_kind: Literal["embedded", "sglang"] = arg("embedded", "embedded (ours, HF transformers) or sglang")
    engine_args: str = arg("", "extra engine flags, one shell-quoted string passed to every engine "
                               "(e.g. \"--dtype bfloat16\"; SGLang: \"--mem-fraction-static 0.7 --tp 2\")")
    rollout_fp8: Literal["off", "block128"] = arg(
        "off", "FP8 rollouts: Linear weights as e4m3 + fp32 scale per 128x128 block at every weight sync; "
        "engines start from an FP8 copy of --hf (quant.fp8)")
    fp8_qat: bool = arg(False, "FP8 quantisation-aware RL: ModelOpt blockwise-e4m3 fake-quant of the Linear / "
                               "expert weights (straight-through gradients), the engine's FP8 numerics (quant.qat)")
    env: str | None = arg(None, "multi-turn rollouts against an environment: 'calc' (the synthetic task's "
                                "calculator) or 'package.module:factory' (rollout.env.Environment); "
                                "--max-new-tokens is then the episode's token budget (policy + environment)")
    max_turns: int = arg(4, "policy turns per episode (with --env)")
    max_tokens_per_turn: int = arg(0, "policy tokens per turn (with --env; 0: only the episode budget)")
    eval_without_env: bool = arg(False, "also evaluate each split single-turn, scored by the verifier "
                                        "(eval/notool_<split>/...)")


# RLConfig's fields (train/rl_config.py declares them and their defaults; its docstring explains
# them at length): the one-line CLI help of each. test_config checks this covers every field.
RL_HELP = {
    "rollout_batch_size": "prompts per RL step (P)",
    "n_samples_per_prompt": "samples per prompt: the group size (n)",
    "max_new_tokens": "response length budget in tokens (multi-turn: the episode's)",
    "temperature": "rollout sampling temperature; the trainer's logits are divided by it too",
    "top_p": "rollout nucleus sampling",
    "num_steps": "RL steps (one rollout batch each)",
    "mini_batches_per_rollout": "optimizer steps per rollout batch (1: fully on-policy)",
    "advantage": "advantage estimator (dr_grpo: no std, constant length normaliser)",
    "eps_low": "PPO clip: ratio >= 1 - eps_low",
    "eps_high": "PPO clip: ratio <= 1 + eps_high (clip-higher when > eps_low)",
    "tis_cap": "truncated importance sampling cap on pi_old / mu (None: off)",
    "eval_n_samples": "samples per eval prompt (pass@k)",
    "eval_max_prompts": "prompts per eval split",
    "eval_temperature": "sampling temperature of the evals (None: --temperature)",
    "icepop_low": "IcePop token mask: keep pi_old / mu >= this (with --icepop-high)",
    "icepop_high": "IcePop token mask: keep pi_old / mu <= this (with --icepop-low)",
    "seq_mask_low": "drop samples whose geometric-mean pi_old / mu is below this",
    "seq_mask_high": "drop samples whose geometric-mean pi_old / mu is above this",
    "kl_coef": "KL(pi || pi_ref) loss coefficient (0: off; > 0 needs --ref-hf)",
    "kl_kind": "KL estimator (k1, k2, k3)",
    "ref_hf": "HF dir of the frozen reference policy (KL)",
    "entropy_coef": "entropy bonus (0: off; the entropy is always logged)",
    "dynamic_sampling": "drop zero-variance groups and draw more prompts (DAPO)",
    "dynamic_sampling_max_rounds": "rollout rounds per step with --dynamic-sampling",
    "overlong_filter": "no loss on truncated samples (DAPO)",
    "overlong_buffer": "DAPO soft overlong punishment: L_cache tokens (0: off)",
    "overlong_penalty": "scale of the soft overlong punishment",
    "async_one_step_off": "generate step s+1's rollouts while step s trains",
    "hpt_gamma": "HPT: SFT on the row's solution for prompts with pass rate <= gamma (None: off)",
    "pack_rollouts": "pack rollout samples into rows instead of right-padding each",
    "pack_max_tokens": "packed row length (0: longest prompt + --max-new-tokens)",
    "lbl_mode": "load-balancing loss: off, micro (per micro-batch) or global (global-batch LBL)",
    "lbl_alpha": "load-balancing loss coefficient (with --lbl-mode micro|global)",
    "expert_bias_rate": "aux-loss-free expert-bias update rate (DeepSeek-V3; 0: off)",
    "routing_replay": "MoE routing replay: r3 (engine's routes), r2 (trainer's old-logprob routes), off",
    "routing_flip_rate": "ask the engines for their routes and log the top-k flip rate vs the trainer",
    "partial_rollout": "abort generations still running once a step has enough groups; continue them next step",
    "partial_rollout_extra_groups": "groups generated beyond --rollout-batch-size per step (--partial-rollout)",
    "loss_impl": "logprobs / entropy / PPO clipping: fused csrc ops or torch (auto: fused if built)",
}
RL_CHOICES = {"kl_kind": KL_KINDS, "lbl_mode": LBL_MODES, "routing_replay": REPLAY_MODES,
              "loss_impl": ("auto", "fused", "torch")}
# RLConfig fields declared by the shared sections above (same names, same defaults)
RL_SHARED = ("micro_batch_size", "seed", "eval_interval", "save_interval")


def _rl_section() -> type:
    """RLConfig's own fields as the ``rl`` section: same names, types and defaults, with help."""
    fields, hints = [], typing.get_type_hints(RLConfig)  # resolved: RLConfig's module has ``from __future__``
    for f in dataclasses.fields(RLConfig):
        if f.name in RL_SHARED:
            continue
        meta = {"help": RL_HELP.get(f.name, "")}
        if f.name in RL_CHOICES:
            meta["choices"] = tuple(RL_CHOICES[f.name])
        fields.append((f.name, hints[f.name], field(default=f.default, metadata=meta)))
    cls = dataclasses.make_dataclass("RLArgs", fields, kw_only=True, namespace={"_argument_group_name": "rl"})
    cls.__module__ = __name__
    return cls


RLArgs = _rl_section()

SFT_TREE = (ModelArgs, MoEArgs, FP8Args, ParallelArgs, OptimizerArgs, TrainingArgs, CheckpointArgs,
            DataArgs, LoggingArgs, SFTArgs)
GRPO_TREE = (ModelArgs, MoEArgs, FP8Args, ParallelArgs, OptimizerArgs, TrainingArgs, CheckpointArgs,
             DataArgs, LoggingArgs, RLArgs, RolloutArgs)
ALL_SECTIONS = (*SFT_TREE, RLArgs, RolloutArgs)


def section_name(dtype: type) -> str:
    """YAML key of a section: its argparse group's first word (``"fp8 / transformer engine"`` -> ``fp8``)."""
    return dtype._argument_group_name.split()[0]
