"""The TRL internals circuit-peft's trainers read (issue 35), one test each, pinned to the TRL range in
pyproject.toml: on a TRL that changes one, its test fails with a message naming the internal, the code
that reads it and the tested range (rather than a trainer silently training something else).

Read by: ``compat.py`` for the private ones, each in ``compat.PATCHES`` with its range (``fused_head_outputs``:
the fused LM head's ``log_probs`` / ``label_mask``; ``keep_signature_columns``: ``_signature_columns``), which
``cca/trainers.py`` calls; ``cca/trainers.py`` itself (PivotalSFTTrainer: ``SFTConfig.loss_type``,
``average_tokens_across_devices``, ``get_tp_size``, the nll reduction it re-weights; ``install_pivotal_columns``:
TRL's collator, ``packing`` / ``padding_free`` / ``truncation_mode``); ``taskdata/`` (``build_pivotal_dataset``'s
pre-tokenized rows, ``PivotalCollator`` around TRL's collator); ``select/sampler.py`` (``_get_train_sampler``) and
``mixins.py`` (``add_mixin``, which re-classes a TRL trainer instance).
"""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import torch
import trl
from trl import SFTConfig, SFTTrainer

from circuit_peft.taskdata import IGNORE_INDEX, WEIGHT_COLUMNS, build_pivotal_dataset
from circuit_peft.interventions import capture_module_output
from circuit_peft.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
# the code that reads the private internals (circuit_peft/compat.py) and the trainer that relies on it
FUSED_READER = "circuit_peft/compat.py fused_head_outputs (for cca/trainers.py PivotalSFTTrainer.compute_loss)"
SIGNATURE_READER = "circuit_peft/compat.py keep_signature_columns (called by cca/trainers.py install_pivotal_columns)"


def trl_range() -> str:
    """The TRL requirement pyproject.toml pins (e.g. ``trl>=1.15,<1.17``)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(r"trl\b", d))


def pinned(ok: bool, internal: str, reader: str) -> None:
    """Fail loudly: TRL changed ``internal``, which ``reader`` relies on."""
    if not ok:
        pytest.fail(f"TRL {trl.__version__} changed {internal}, which {reader} reads; circuit-peft is tested on "
                    f"{trl_range()!r} (pyproject.toml; compat.PATCHES for compat.py's reaches): adapt {reader} "
                    "and widen the range, or install a TRL in it", pytrace=False)


def _rows():
    rows = [{"input_ids": [1, 5, 6, 7, 8, 9], "completion_mask": [0, 0, 0, 1, 1, 1], "pivotal_positions": [4]},
            {"input_ids": [1, 11, 12, 13, 14, 15, 16, 17], "completion_mask": [0, 0, 0, 0, 0, 1, 1, 1],
             "pivotal_positions": [6, 7]}]
    return build_pivotal_dataset(rows, pivotal_weight=5.0)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A plain SFTTrainer on a tiny llama and pre-tokenized pivotal rows (one for the module: the tests that
    change it, by installing columns or a sampler, come last); ``trl_collator`` keeps TRL's own collator."""
    from circuit_peft.models import load_tokenizer

    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("sft")), per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=64)
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=_rows(),
                         processing_class=load_tokenizer("smollm2", padding_side="right"))
    trainer.trl_collator = trainer.data_collator
    return trainer


def test_pinned_range_holds_the_installed_trl():
    from packaging.requirements import Requirement

    req = Requirement(trl_range())
    assert req.specifier.contains(trl.__version__), \
        f"TRL {trl.__version__} is outside the tested range {trl_range()!r}: run tests/test_trl_internals.py on it"
    # 1.14 has no fused LM head; 1.15's needs Triton (SFTTrainer cannot train on a CPU-only torch); 1.17: untested
    assert req.specifier.contains("1.16.0") and not any(req.specifier.contains(v) for v in ("1.14.2", "1.15.0", "1.17.0"))


def test_sft_config_fields_the_trainers_read():
    """``loss_type`` (default "nll"), ``packing``, ``padding_free``, ``truncation_mode`` (keep_start / keep_end),
    ``average_tokens_across_devices``."""
    fields = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    expected = {"loss_type": "nll", "packing": False, "padding_free": False, "truncation_mode": "keep_start",
                "average_tokens_across_devices": True}
    pinned(all(fields.get(k, "MISSING") == v for k, v in expected.items()),
           f"SFTConfig fields {sorted(expected)} (defaults now { {k: fields.get(k, 'MISSING') for k in expected} })",
           "cca/trainers.py (PivotalSFTTrainer: loss_type, average_tokens_across_devices; install_pivotal_columns: "
           "packing, padding_free, truncation_mode) and taskdata/collate.py (PivotalCollator)")
    pinned(SFTConfig(output_dir="x", truncation_mode="keep_end", report_to=[], use_cpu=True, bf16=False).truncation_mode == "keep_end",
           "SFTConfig.truncation_mode='keep_end'", "taskdata/collate.py (PivotalCollator slices weights the same way)")


def test_pre_tokenized_rows_keep_their_columns(sft):
    """A dataset with ``input_ids`` is not re-tokenized: its ``labels`` and weight columns reach the collator as is."""
    columns = set(sft.train_dataset.column_names)
    pinned({"input_ids", "labels", *WEIGHT_COLUMNS} <= columns,
           f"SFTTrainer._prepare_dataset on pre-tokenized rows (columns now {sorted(columns)})",
           "taskdata/examples.py build_pivotal_dataset + cca/trainers.py install_pivotal_columns")
    pinned(sft.train_dataset[0]["labels"] == _rows()[0]["labels"],
           "SFTTrainer._prepare_dataset: a given 'labels' column is no longer taken as is",
           "taskdata/examples.py build_pivotal_dataset (labels=-100 outside the completion)")


def test_collator_pads_with_an_attention_mask(sft):
    """TRL's collator, which PivotalCollator wraps, returns ``input_ids``/``attention_mask``/``labels`` of one shape."""
    rows = [{k: v for k, v in sft.train_dataset[i].items() if k not in WEIGHT_COLUMNS} for i in range(2)]
    batch = sft.trl_collator(rows)
    shapes = {k: tuple(batch[k].shape) for k in ("input_ids", "attention_mask", "labels") if k in batch}
    pinned(len(shapes) == 3 and len(set(shapes.values())) == 1,
           f"SFTTrainer's data collator output (got {shapes})", "taskdata/collate.py PivotalCollator")


def test_fused_lm_head_log_probs_and_label_mask(sft):
    """``model(..., fused_lm_head=True)`` (what SFTTrainer.compute_loss runs) returns per-token ``log_probs``
    (B, T-1), zero where the label is ignored, and ``label_mask`` (B, T-1); compute_loss's nll is their
    mean. ``compat.fused_head_outputs`` captures that output for PivotalSFTTrainer, which re-weights ``log_probs``."""
    rows = [sft.train_dataset[i] for i in range(2)]
    batch = sft.trl_collator([{k: v for k, v in r.items() if k not in WEIGHT_COLUMNS} for r in rows])
    model = sft.model
    model.train()
    try:
        with capture_module_output(model) as captured:
            loss = sft.compute_loss(model, dict(batch))
    except Exception as err:  # noqa: BLE001  (TRL 1.15 on a CPU-only torch: its fused head needs Triton)
        pinned(False, f"SFTTrainer.compute_loss's fused LM head (it raised {err!r})", FUSED_READER)
    out = captured.get("out")
    log_probs, label_mask = getattr(out, "log_probs", None), getattr(out, "label_mask", None)
    pinned(log_probs is not None and label_mask is not None,
           "the fused LM head outputs (log_probs, label_mask) of the model's forward in SFTTrainer.compute_loss",
           FUSED_READER)
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    valid = labels != IGNORE_INDEX
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid
    pinned(tuple(log_probs.shape) == tuple(labels.shape) and torch.allclose(log_probs.detach(), ref, atol=1e-5),
           f"the meaning of outputs.log_probs (shape {tuple(log_probs.shape)}, expected per-token log p(label) "
           f"{tuple(labels.shape)}, 0 on ignored labels)", FUSED_READER)
    pinned(torch.equal(label_mask.bool(), valid), "the meaning of outputs.label_mask (labels[:, 1:] != -100)",
           FUSED_READER)
    pinned(torch.allclose(loss, -log_probs.sum() / label_mask.sum(), rtol=1e-6),
           "SFTTrainer.compute_loss's nll reduction (-sum(log_probs) / label_mask.sum())",
           "cca/trainers.py PivotalSFTTrainer.compute_loss (all weights 1 must give TRL's loss)")


def test_tensor_parallel_size(sft):
    """``get_tp_size()`` scales the loss under ``average_tokens_across_devices`` as TRL's own loss does."""
    pinned(callable(getattr(sft, "get_tp_size", None)) and sft.get_tp_size() == 1,
           "SFTTrainer.get_tp_size()", "cca/trainers.py PivotalSFTTrainer.compute_loss")


def test_signature_columns(sft):
    """``_set_signature_columns_if_needed`` fills ``_signature_columns``, the list ``remove_unused_columns`` keeps:
    install_pivotal_columns appends the weight columns to it through ``compat.keep_signature_columns``."""
    from circuit_peft.cca.trainers import install_pivotal_columns

    sft._signature_columns = None
    sft._set_signature_columns_if_needed()
    columns = getattr(sft, "_signature_columns", None)
    pinned(isinstance(columns, list) and "input_ids" in columns and "labels" in columns,
           f"SFTTrainer._set_signature_columns_if_needed / _signature_columns (got {columns!r})", SIGNATURE_READER)
    install_pivotal_columns(sft)
    batch = next(iter(sft.get_train_dataloader()))
    pinned(all(c in batch for c in WEIGHT_COLUMNS),
           f"how remove_unused_columns uses _signature_columns (batch columns: {sorted(batch)})", SIGNATURE_READER)


def test_train_sampler_hook(sft):
    """``get_train_dataloader`` takes its sampler from ``_get_train_sampler``: CircuitSeerSamplerMixin overrides it,
    and ``add_mixin`` re-classes a TRL trainer instance (``use_sampler``)."""
    from circuit_peft.select.sampler import CircuitSeerSampler, use_sampler

    sampler = CircuitSeerSampler([1.0, 0.0], k=1, tau=0.0)
    use_sampler(sft, sampler)
    loader = sft.get_train_dataloader()
    chosen = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    pinned(sampler in (chosen, inner) or [len(b["input_ids"]) for b in loader] == [1],
           "Trainer/SFTTrainer._get_train_sampler (the train dataloader no longer asks it for its sampler)",
           "select/sampler.py CircuitSeerSamplerMixin")
