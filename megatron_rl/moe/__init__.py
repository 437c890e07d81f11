"""MoE training aids: exact global-batch load balancing and router load metrics."""

from megatron_rl.moe.global_lbl import (GlobalLBL, global_lbl_coefficients, lbl_surrogate,
                                        lbl_value, routed_counts)
from megatron_rl.moe.router_metrics import router_load_metrics

__all__ = ["GlobalLBL", "global_lbl_coefficients", "lbl_surrogate", "lbl_value",
           "routed_counts", "router_load_metrics"]
