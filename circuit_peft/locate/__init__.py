"""Locating circuits: every locator registered under one name (:mod:`.registry`): DCM masks and logit-difference
attribution (CCA stage 2), the head ablation scan, its estimate and the refined scan (CircuitSeer stage 1), gradients."""

from .ablation import head_ablation_scan, probe_batches, solution_losses
from .attribution import attribution_scan
from .controls import RANDOM_MATCHES, random_circuit
from .dcm import NaNLossError, circuit_margin, learn_masks
from .gradient import general_text_rows, gradient_scan
from .refine import refined_head_scan
from .registry import LOCATORS, Locator, LocatorSpec, get_locator, locator_names, register_locator, run_locator
from ..taskdata.examples import ProbeSpec

__all__ = ["LOCATORS", "Locator", "LocatorSpec", "get_locator", "locator_names", "register_locator", "run_locator", "NaNLossError", "ProbeSpec", "RANDOM_MATCHES", "attribution_scan", "circuit_margin", "general_text_rows", "gradient_scan", "random_circuit", "refined_head_scan", "head_ablation_scan", "learn_masks", "probe_batches",
           "solution_losses"]
