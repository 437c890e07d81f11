"""Load balancing for one optimizer step of the RL / SFT loop: router load metrics every step,
an optional load-balancing loss (LBL) per micro-batch or over the global batch, and the
aux-loss-free expert-bias update, all driven by the exact routed-token counts of the step.

Legend: L = decoder layers, E = experts, K = top-k, M = micro-batches of the step over all DP
ranks, N = valid (``loss_mask``) tokens of the step over all DP ranks, N_b / C^b = valid tokens /
routed counts [E] of micro-batch b, D = the global loss-token count Megatron divides every
gradient by (``calculate_per_token_loss``).

Modes (``LoadBalance.mode``):
  * ``"off"``: no LBL gradient; counts and metrics only.
  * ``"global"``: exact global-batch LBL (``GlobalLBL``; Qiu et al., "Demons in the Detail",
    arXiv 2501.11873): L = alpha E sum_i f_i P_i with f_i = C_i / (K N), P_i = mean_x p_{x,i}
    over the whole step.
  * ``"micro"``: the per-micro-batch Switch LBL baseline of the same paper, done exactly:
    L = (1/M) sum_b alpha E sum_i f^b_i P^b_i, f^b_i = C^b_i / (K N_b), P^b_i = (1/N_b)
    sum_{x in b, valid} p_{x,i} (L_b = 0 for a micro-batch without valid tokens; it still counts
    in M). The gradient is injected with the same identity-autograd trick as ``GlobalLBL``, so
    Megatron's division by D is cancelled and the result does not depend on D.
    Megatron's own aux loss is not used: with ``calculate_per_token_loss`` Megatron-Core 0.19.2
    (``Router.attach_and_log_load_balancing_loss``) multiplies each micro-batch's aux loss by that
    micro-batch's router token count (padding included unless a padding mask is passed) times
    the TP x CP size and relies on ``finalize_model_grads`` dividing by D; that is the mean over
    micro-batches only when every micro-batch has the same token count and D counts the same
    tokens. In RL, D is the number of loss (response) tokens, micro-batches are uneven and the
    router also sees prompt and padding tokens, so the effective coefficient is a
    token-weighted mean inflated by (router tokens / loss tokens).

Expert bias (``bias_update_rate > 0``; DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2, "auxiliary-
loss-free load balancing"): after the step, on every router with ``expert_bias`` (Megatron's
``moe_router_enable_expert_bias``), b_i += rate * sign(mean_j C_j - C_i) with C the exact global
counts of the step (valid tokens only, all DP ranks, SP shards and micro-batches). Megatron's
own update (``finalize_model_grads`` -> ``_update_router_expert_bias`` with
``moe_router_bias_update_rate``, counting padding tokens too, from ``local_tokens_per_expert``)
would run as well, so it must be 0 (``--moe-router-bias-update-rate 0``); then Megatron's
update adds ``0 * sign(...)`` and only resets its ``local_tokens_per_expert`` buffer.

RL defaults, with reasons: mode "off" / alpha 0 (an LBL fights the policy objective; NeMo-RL and
verl ship without it, and RL steps are few and small so a per-micro-batch balance is noisy),
bias update rate 0 (moving the bias changes the routes the rollout engine uses between weight
syncs; keep the pretrained bias unless balance degrades), Megatron's aux losses off (never
``seq_aux_loss`` or any aux loss silently: they are refused with mode != "off" and warned
about with mode "off").

Left out: MTP routers, context parallelism, recompute of MoE layers (see ``global_lbl``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from megatron_rl.moe.global_lbl import GlobalLBL, _routers

MODES = ("off", "micro", "global")


def micro_lbl_coefficients(mb_counts: torch.Tensor, mb_tokens: torch.Tensor, n_microbatches: int,
                           topk: int, alpha: float) -> torch.Tensor:
    """Per-micro-batch weights w with (1/M) L_b = sum_{l,i} w_{b,l,i} sum_{x in b, valid} p_{x,i}.

    Args:
        mb_counts: [M_local, L, E] routed valid-token counts C^b of this rank's micro-batches.
        mb_tokens: [M_local] valid tokens N_b.
        n_microbatches: M, micro-batches over all DP ranks (>= 1).
        topk / alpha: K, LBL coefficient.
    Returns:
        [M_local, L, E] float64 ``alpha E C^b / (K N_b^2 M)`` (0 where N_b = 0).
    Raises:
        ValueError: ``n_microbatches < 1`` or ``topk < 1``.
    """
    if n_microbatches < 1 or topk < 1:
        raise ValueError(f"need n_microbatches >= 1 and topk >= 1, got {n_microbatches}, {topk}")
    e = mb_counts.shape[-1]
    n = mb_tokens.double()
    inv = torch.where(n > 0, 1.0 / n.clamp_min(1.0) ** 2, torch.zeros_like(n))
    return alpha * e * mb_counts.double() * inv[:, None, None] / (topk * n_microbatches)


def expert_bias_update(counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free bias step ``rate * sign(mean_i C_i - C_i)`` (DeepSeek-V3 sec. 2.1.2).

    Args:
        counts: [L, E] global routed-token counts. rate: step size (units of router score).
    Returns:
        [L, E] float64 increment (under-loaded experts +rate, over-loaded -rate, exact mean 0).
    """
    c = counts.double()
    return rate * torch.sign(c.mean(-1, keepdim=True) - c)


@dataclass
class LoadBalance:
    """Per-optimizer-step load balancing (see module docstring).

    Attributes:
        mode: "off" | "micro" | "global".
        alpha: LBL coefficient (>= 0; 0 = no LBL gradient in any mode).
        bias_update_rate: expert-bias step after each optimizer step (>= 0; 0 = off).
        detach_router_input: the LBL gradient reaches the router weights only.
        mask_key: batch key of the [B, S] validity mask.
    Use per optimizer step: ``metrics = lb.prepare(tr, mbs)``; ``with lb.forward_step(tr, fwd,
    grad_divisor=D) as f: train_step(tr, mbs, forward_step=f)``; ``metrics |= lb.after_step(tr)``.
    Raises ValueError at construction: mode not in ``MODES``, alpha < 0, alpha > 0 with mode
    "off" (it would be ignored), bias_update_rate < 0.
    """

    mode: str = "off"
    alpha: float = 0.0
    bias_update_rate: float = 0.0
    detach_router_input: bool = False
    mask_key: str = "loss_mask"
    lbl: GlobalLBL | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LoadBalance: mode {self.mode!r} not in {MODES}")
        if self.alpha < 0:
            raise ValueError(f"LoadBalance: alpha must be >= 0, got {self.alpha}")
        if self.mode == "off" and self.alpha > 0:
            raise ValueError(f"LoadBalance: alpha={self.alpha} > 0 with mode 'off' would be "
                             "ignored; choose mode 'micro' or 'global', or alpha 0")
        if self.bias_update_rate < 0:
            raise ValueError(f"LoadBalance: bias_update_rate must be >= 0, got "
                             f"{self.bias_update_rate}")

    @property
    def lbl_on(self) -> bool:
        return self.mode != "off" and self.alpha > 0

    def check(self, trainer) -> None:
        """Refuse settings that would silently do something else.

        Raises:
            ValueError: Megatron's aux loss on (``--moe-aux-loss-coeff`` > 0 with
                ``moe_router_load_balancing_type`` aux_loss / seq_aux_loss / global_aux_loss)
                with mode != "off"; alpha > 0 with a frozen router; bias_update_rate > 0
                without ``moe_router_enable_expert_bias`` or with Megatron's own
                ``moe_router_bias_update_rate`` != 0 (double update).
        """
        cfg = trainer.config
        routers = _routers(trainer.model)
        aux_types = sorted({str(r.routing_type) for r in routers if r.is_aux_loss_enabled()})
        meg_aux = ", ".join(aux_types)
        if meg_aux and self.mode != "off":
            raise ValueError(
                f"LoadBalance(mode={self.mode!r}): Megatron's own aux loss is enabled "
                f"(moe_router_load_balancing_type={meg_aux}, "
                f"--moe-aux-loss-coeff={cfg.moe_aux_loss_coeff}); set the coefficient to 0 / "
                "the type to 'none'")
        if meg_aux:
            warnings.warn(f"Megatron's aux loss {meg_aux} is on "
                          f"(--moe-aux-loss-coeff={cfg.moe_aux_loss_coeff}); its per-token-loss "
                          "scaling is not the mean over micro-batches (see megatron_rl.moe."
                          "balance)", stacklevel=3)
        if self.lbl_on:
            for r in routers:
                if not r.weight.requires_grad:
                    raise ValueError(f"LoadBalance: router of layer {r.layer_number} is frozen "
                                     f"(requires_grad=False) but alpha={self.alpha} > 0")
        if self.bias_update_rate > 0:
            if not cfg.moe_router_enable_expert_bias:
                raise ValueError("LoadBalance: bias_update_rate > 0 needs a router with expert "
                                 "bias (moe_router_enable_expert_bias / "
                                 "--moe-router-enable-expert-bias, sigmoid scores)")
            if cfg.moe_router_bias_update_rate != 0:
                raise ValueError(
                    "LoadBalance: Megatron's own expert-bias update is also on "
                    f"(--moe-router-bias-update-rate={cfg.moe_router_bias_update_rate}); set it "
                    "to 0 so the bias is updated once, from the exact counts")
        elif cfg.moe_router_enable_expert_bias and cfg.moe_router_bias_update_rate != 0:
            warnings.warn("Megatron updates the expert bias itself (--moe-router-bias-update-"
                          f"rate={cfg.moe_router_bias_update_rate}, padding tokens counted); "
                          "use LoadBalance(bias_update_rate=...) with it set to 0", stacklevel=3)

    def prepare(self, trainer, microbatches: list, *, local_counts: torch.Tensor | None = None,
                mb_counts: torch.Tensor | None = None) -> dict[str, float]:
        """Phase A of the step: exact global routed counts (collective over all ranks).

        Args:
            trainer: the ``Trainer``.
            microbatches: this rank's micro-batches of the step, in the order ``train_step``
                will run them; dicts (or ``rl_batch.MicroBatch``) with tokens / position_ids /
                attention_mask and ``mask_key`` ([B, S], 1 = valid token).
            local_counts: optional [num_layers, E] counts this rank already has (see
                ``GlobalLBL.set_local_counts``); skips the extra no-grad forward.
            mb_counts: optional [M_local, num_layers, E] the same per micro-batch; required
                with local_counts in mode "micro" with alpha > 0.
        Returns:
            ``moe/max_violation``, ``moe/layer{i}/max_violation``, ``moe/layer{i}/min_load``,
            ``moe/layer{i}/load_entropy`` (``router_metrics.router_load_metrics``) of the step.
        Raises:
            ValueError: see ``check``; local_counts without mb_counts in mode "micro" with
                alpha > 0.
        """
        self.check(trainer)
        self.lbl = GlobalLBL(alpha=self.alpha if self.lbl_on else 0.0,
                             detach_router_input=self.detach_router_input,
                             mask_key=self.mask_key)
        if local_counts is None:
            return self.lbl.collect_counts(trainer, microbatches)
        if self.mode == "micro" and self.lbl_on and mb_counts is None:
            raise ValueError("LoadBalance(mode='micro') needs per-micro-batch counts; "
                             "pass mb_counts or call prepare without local_counts")
        return self.lbl.set_local_counts(trainer, microbatches, local_counts, mb_counts=mb_counts)

    @contextlib.contextmanager
    def forward_step(self, trainer, forward_step: Callable,
                     grad_divisor: float) -> Iterator[Callable]:
        """Yields the forward step to hand to ``train_step`` for this step.

        Args:
            forward_step: the Megatron forward_step_func of the loop (returns the 3-tuple loss).
            grad_divisor: D, the global loss-token count of the step that ``finalize_model_grads``
                divides every gradient by (the mini-batch's loss tokens over all DP ranks; the
                sum of the loss function's ``num_tokens``).
        Mode "off" (or alpha 0) yields ``forward_step`` unchanged.
        Raises:
            RuntimeError: ``prepare`` was not called for this step.
        """
        if self.lbl is None:
            raise RuntimeError("LoadBalance.forward_step: call prepare first (phase A)")
        if not self.lbl_on:
            yield forward_step
            return
        weights = None
        if self.mode == "micro":
            weights = micro_lbl_coefficients(self.lbl.mb_counts, self.lbl.mb_tokens,
                                             self.lbl.n_microbatches, self.lbl.topk, self.alpha)
        with self.lbl.attached(trainer, forward_step, grad_divisor=grad_divisor,
                               weights=weights) as step:
            yield step

    def after_step(self, trainer) -> dict[str, float]:
        """Expert-bias update from the step's global counts (no-op when the rate is 0).

        Call once after ``train_step`` (whether or not the update was applied: the counts of
        the step stand). Returns ``{"moe/bias_abs_mean": mean |b|}`` over this rank's updated
        routers, or {}. Raises RuntimeError without ``prepare``."""
        if self.lbl is None:
            raise RuntimeError("LoadBalance.after_step: call prepare first")
        if self.bias_update_rate <= 0:
            return {}
        delta = expert_bias_update(self.lbl.counts, self.bias_update_rate)  # [L, E]
        biases = []
        with torch.no_grad():
            for r in _routers(trainer.model):
                if r.expert_bias is None:
                    continue
                i = r.layer_number - 1
                r.expert_bias.add_(delta[i].to(r.expert_bias.dtype).to(r.expert_bias.device))
                biases.append(r.expert_bias.detach().abs().mean())
        return {"moe/bias_abs_mean": float(torch.stack(biases).mean())} if biases else {}
