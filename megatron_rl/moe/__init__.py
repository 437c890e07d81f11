"""MoE training aids: exact global-batch load balancing, per-step load-balance modes with the
expert-bias update, and router load metrics."""

from megatron_rl.moe.balance import (MODES, LoadBalance, expert_bias_update,
                                     micro_lbl_coefficients)
from megatron_rl.moe.global_lbl import (GlobalLBL, global_lbl_coefficients, lbl_surrogate,
                                        lbl_value, routed_counts)
from megatron_rl.moe.router_metrics import router_load_metrics

__all__ = ["MODES", "GlobalLBL", "LoadBalance", "expert_bias_update", "global_lbl_coefficients",
           "lbl_surrogate", "lbl_value", "micro_lbl_coefficients", "routed_counts",
           "router_load_metrics"]
