"""The orchestration core (issue 37 step 3): one CCA update whose kept step is an explicit field, the run
folder's key (a folder made before a field existed resumes), and train() given a loaded model."""

import pytest
import torch

from circuit_peft.cca.fit import CCAUpdateSpec, cca_update
from circuit_peft.cca.update import UpdateConfig
from circuit_peft.errors import CircuitPeftError
from circuit_peft.models import tiny_model
from circuit_peft.recipe import SFTSettings, TrainConfig
from circuit_peft.recipe.config import run_settings
from circuit_peft.tuner import CircuitConfig

CIRCUIT = [("q", 1, 0), ("k", 1, 1), ("v", 2, 1), ("mlp", 1, 3), ("mlp", 2, 7)]


def _records(n=8, vocab=128):
    g = torch.Generator().manual_seed(0)
    return [{"context_ids": torch.randint(3, vocab, (6,), generator=g).tolist(), "desired_id": 5,
             "undesired_id": 9, "problem_id": i} for i in range(n)]


def _update(kept_step, validate):
    spec = CCAUpdateSpec(UpdateConfig(steps=6, lr=5e-2, optimizer="adam", eval_every=2), kept_step=kept_step)
    return cca_update(tiny_model("llama"), _records(), CircuitConfig.from_components(CIRCUIT), spec, validate,
                      progress=False)


def test_the_kept_step_is_the_field_not_the_caller():
    """The same validator: 'best_validated' keeps the best scored step, 'last' the last one (validation only
    recorded); 'best_validated' without a validator is refused before any step."""
    best = _update("best_validated", lambda m, s=iter([0.1, 0.9, 0.2, 0.3]): next(s))
    assert best.best_step == 2 and best.best_val == 0.9 and best.kept.startswith("best validated")
    last = _update("last", lambda m, s=iter([0.1, 0.9, 0.2, 0.3]): next(s))
    assert last.best_step == 6 and last.kept.startswith("last") and any("val" in h for h in last.history)
    with pytest.raises(CircuitPeftError, match="kept_step='best_validated' needs validation"):
        _update("best_validated", None)
    with pytest.raises(CircuitPeftError, match="kept_step must be one of"):
        CCAUpdateSpec(kept_step="best")


def test_run_key_keeps_folders_made_before_new_fields_and_holds_back_validation_rows():
    """The default config's key has neither cca_kept_step nor validation_fraction (folders made before them
    resume); a validated CCA step holds validation rows back and is part of the key."""
    rows = [{"question": "1+1?", "answer": "2"}]
    plain = run_settings("m", TrainConfig(), rows, rows)["config"]
    assert "cca_kept_step" not in plain and "validation_fraction" not in plain and "learning_rates" not in plain
    cfg = TrainConfig(update="cca", cca_kept_step="best_validated")
    assert cfg.holds_validation and not TrainConfig(update="cca").holds_validation
    keyed = run_settings("m", cfg, rows, rows)["config"]
    assert keyed["cca_kept_step"] == "best_validated" and keyed["validation_fraction"] == 0.2
    with pytest.raises(ValueError, match="cca_kept_step must be"):
        TrainConfig(cca_kept_step="best")


@pytest.mark.slow
def test_train_takes_a_loaded_model_and_its_folder_resumes_by_name(tmp_path):
    """train(model object): the model is used as given (wrapped in place), the run folder records its
    name_or_path, and the same run by name reuses every stage."""
    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.models import load_model, load_tokenizer
    from circuit_peft.recipe import train

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=49152).save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    cfg = TrainConfig(max_new_tokens=8, max_cut_share=1.0, shots=[dict(s) for s in ARITHMETIC_SHOTS],
                      sft=SFTSettings(epochs=1.0), load={"device": "cpu", "dtype": "float32"})
    rows, held = make_problems(6, "train", seed=0), make_problems(3, "test", seed=0)
    model = load_model(str(model_dir), spec=cfg.load)
    result = train(model, rows, held, tmp_path / "run", cfg, log=lambda _: None)
    assert result.model.get_base_model() is model and result.report["model"] == str(model_dir)
    logs: list[str] = []
    again = train(str(model_dir), rows, held, tmp_path / "run", cfg, log=logs.append)
    assert all(any(f"[{s}] done earlier" in line for line in logs) for s in ("locate", "before", "train", "after"))
    assert again.report["after"] == result.report["after"]
    with pytest.raises(ValueError, match="no name_or_path"):
        train(tiny_model("llama"), rows, held, tmp_path / "other", cfg, log=lambda _: None)


def test_run_schema_keys_added_fields_only_away_from_their_old_value_and_versions_enter_the_key():
    from circuit_peft.runs import RunSchema, fingerprint

    v1 = RunSchema("x", volatile=("threads",), added={"new": (), "mode": "old"})
    assert v1.settings({"a": 1, "threads": 4, "new": [], "mode": "old"}, model="m") == {"model": "m", "config": {"a": 1}}
    assert v1.config({"a": 1, "new": [0.1], "mode": "other"}) == {"a": 1, "new": [0.1], "mode": "other"}
    v2 = RunSchema("x", version=2)
    assert v2.settings({"a": 1})["schema"] == "x/2"
    assert fingerprint(v2.settings({"a": 1})) != fingerprint(RunSchema("x").settings({"a": 1}))


def test_a_model_given_loaded_is_keyed_by_how_it_was_loaded():
    """train(model object) records the model's own dtype (not cfg.load's default) in its run folder's key."""
    from circuit_peft.recipe.pipeline import _given_spec

    model = tiny_model("llama")
    assert _given_spec(model).settings() == {}  # float32: what a folder made by name on the CPU records
    assert _given_spec(model.to(torch.bfloat16)).settings() == {"dtype": "bfloat16"}
