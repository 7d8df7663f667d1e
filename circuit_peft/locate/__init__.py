"""Locating circuits: DCM masks (CCA stage 2), head ablation scans (CircuitSeer stage 1), attribution."""

from .ablation import head_ablation_scan, probe_batches, solution_losses
from .attribution import attribution_scan

__all__ = ["attribution_scan", "head_ablation_scan", "probe_batches", "solution_losses"]
