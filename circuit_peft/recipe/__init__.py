"""The training recipe: pivotal SFT of a located circuit (:mod:`.sft`) and the one-call pipeline (:mod:`.pipeline`):
its settings (:mod:`.config`), the run context the stages share (:mod:`.context`), the stages (:mod:`.stages`:
select, locate, evaluate, fit [sft | cca], rate grid, side effects, controls) and the report (:mod:`.report`)."""

from .controls import CONTROLS, control_model, matched_lora_rank, paired_gap
from .pipeline import LOCATORS, SELECTORS, RunFolder, TrainConfig, TrainResult, model_card, summary_table, train
from .rates import RateChoice, fit_on_grid, validation_split
from .seeds import seeds_table, summarise_seeds, write_seeds_summary
from .sft import SFTSettings, answer_spans, gold_examples, pivotal_dataset, train_sft

__all__ = [
    "CONTROLS", "LOCATORS", "SELECTORS", "answer_spans", "control_model", "fit_on_grid", "gold_examples",
    "matched_lora_rank", "model_card", "paired_gap", "pivotal_dataset", "RateChoice", "RunFolder", "seeds_table",
    "SFTSettings", "summarise_seeds", "summary_table", "train", "train_sft", "TrainConfig", "TrainResult",
    "validation_split", "write_seeds_summary",
]
