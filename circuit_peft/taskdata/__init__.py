"""Task data, the bottom floor every wing stands on: "prompt + answer -> tokenized example -> masked batch ->
loss", written once.

* :mod:`.examples`: THE encoder of a tokenized example (ids, loss mask, token weights, undesired ids, prompt
  length) and THE truncation policy (:func:`fit_to_length`); pivotal SFT rows; probe rows.
* :mod:`.prompts`: the prompt styles (chat template, few-shot, a TRL row's own prompt and completion).
* :mod:`.records`: contrastive records (validate, collate).
* :mod:`.collate`: examples -> padded batches (SFT rows right-padded, probe rows left-padded).
* :mod:`.losses`: the pivotal-weighted loss, the solution loss, the contrastive margin.

Imports only the floor below it (``batching``, ``validation``, ``errors``; TRL's chat-template helper); SFT, the locators, CCA, CircuitSeer,
evaluation and the benchmarks import it, never the reverse.
"""

from .collate import PivotalCollator, collate_probe, collate_probe_after_prefix, model_inputs
from .examples import (
    DEFAULT_PIVOTAL_WEIGHT, WEIGHT_COLUMNS, EncodedProbe, ProbeSpec, answer_example, as_rows, build_pivotal_dataset,
    encode_probe, encode_text_pair, fit_to_length, split_task_row,
)
from .losses import (
    IGNORE_INDEX, MARGIN_LOSSES, aligned_weighted_loss, at_least_float32, last_logits, logit_margins, margin_loss,
    mean_label_losses, pivotal_weighted_loss, solution_loss_sums,
)
from .records import RECORD_FIELDS, collate_records, record_name, validate_records

__all__ = [
    "DEFAULT_PIVOTAL_WEIGHT", "EncodedProbe", "IGNORE_INDEX", "MARGIN_LOSSES", "PivotalCollator", "ProbeSpec", "RECORD_FIELDS",
    "WEIGHT_COLUMNS", "aligned_weighted_loss", "answer_example", "as_rows", "at_least_float32",
    "build_pivotal_dataset", "collate_probe", "collate_probe_after_prefix", "collate_records", "encode_probe", "encode_text_pair",
    "fit_to_length", "last_logits", "logit_margins", "margin_loss", "mean_label_losses", "model_inputs", "pivotal_weighted_loss", "split_task_row",
    "record_name", "solution_loss_sums", "validate_records",
]
