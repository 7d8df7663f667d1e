"""Locating circuits: DCM masks (CCA stage 2), head ablation scans (CircuitSeer stage 1), attribution."""

from .ablation import head_ablation_scan, probe_batches, solution_losses
from .attribution import attribution_scan
from .dcm import NaNLossError, learn_masks

__all__ = ["NaNLossError", "attribution_scan", "head_ablation_scan", "learn_masks", "probe_batches",
           "solution_losses"]
