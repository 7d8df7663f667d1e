"""The training recipe: pivotal SFT of a located circuit (:mod:`.sft`) and the one-call pipeline (:mod:`.pipeline`)."""

from .controls import CONTROLS, control_model, matched_lora_rank, paired_gap
from .pipeline import LOCATORS, SELECTORS, RunFolder, TrainConfig, TrainResult, model_card, summary_table, train
from .seeds import seeds_table, summarise_seeds, write_seeds_summary
from .sft import SFTSettings, answer_spans, gold_examples, pivotal_dataset, train_sft

__all__ = [
    "CONTROLS", "LOCATORS", "SELECTORS", "answer_spans", "control_model", "gold_examples",
    "matched_lora_rank", "model_card", "paired_gap", "pivotal_dataset", "RunFolder", "seeds_table",
    "SFTSettings", "summarise_seeds", "summary_table", "train", "train_sft", "TrainConfig", "TrainResult",
    "write_seeds_summary",
]
