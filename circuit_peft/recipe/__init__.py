"""The training recipe: pivotal SFT of a located circuit (:mod:`.sft`) and the one-call pipeline (:mod:`.pipeline`)."""

from .pipeline import LOCATORS, SELECTORS, RunFolder, TrainConfig, TrainResult, model_card, summary_table, train
from .sft import SFTSettings, answer_spans, gold_examples, pivotal_dataset, train_sft

__all__ = ["LOCATORS", "SELECTORS", "RunFolder", "SFTSettings", "TrainConfig", "TrainResult", "answer_spans",
           "gold_examples", "model_card", "pivotal_dataset", "summary_table", "train", "train_sft"]
