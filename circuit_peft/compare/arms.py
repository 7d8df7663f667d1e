"""The arms of a comparison: what each trains, how, and over which learning rates.

An arm is named ``KIND`` or ``KIND@LOCATOR`` (``--arms base,located,twin@ablation,lora,lora_matched,full``):

* ``base``: the model untrained (drift 0): every other arm's frontier starts here;
* ``located@L``: the circuit found by locator ``L`` (default: ``--locate``) on the fit rows, trained with the
  recipe's pivotal SFT (:func:`~circuit_peft.recipe.sft.train_sft`);
* ``twin@L``: its layer-matched random twin (:data:`~circuit_peft.recipe.controls.CONTROLS` ``random_layer``);
* ``lora``: LoRA r=16 on every linear layer; ``lora_matched@L``: LoRA whose parameters match ``located@L``'s;
* ``full``: full fine-tuning.

Every arm but ``base`` is built from a fresh base model by :func:`~circuit_peft.recipe.controls.control_model`
(or ``get_peft_model`` for the located circuit) and trained by one SFT run per rate with measurements at
checkpoints. Another method (e.g. the CCA update with and without its mask) is added with
:func:`register_arm_kind`: a builder (fresh model -> trainable model) and a trainer that calls
``on_checkpoint(model, step)`` at each checkpoint it wants measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ..errors import CircuitPeftError

CIRCUIT_LRS: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # the circuit and LoRA grid of benchmarks/recipes.py
FULL_LRS: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # full fine-tuning's grid there


@dataclass
class ArmContext:
    """What a builder and a trainer need for one seed: the model name, tokenizer, prompt style, the fit rows
    (training rows minus the validation rows), the run's :class:`~circuit_peft.recipe.TrainConfig` (its
    seed, SFT settings, circuit fraction), ``circuit(locator)`` (the located circuit of this seed),
    ``checkpoints`` (how many measured points per run) and a scratch folder; ``folder``: the run folder (files
    an arm kind shares across its runs, kept); ``validate(model) -> validation accuracy`` and ``measure(model) ->
    a point`` at the seed's token cap (for arms that choose a step on validation themselves)."""

    model_name: str
    tokenizer: Any
    style: str
    rows: list[dict[str, Any]]
    config: Any
    circuit: Callable[[str], Any]
    checkpoints: int
    workdir: Path
    load_model: Callable[[], nn.Module]
    folder: Path | None = None
    validate: Callable[[nn.Module], float] | None = None
    measure: Callable[[nn.Module], dict[str, Any]] | None = None


Checkpoint = Callable[[nn.Module, int], None]


@dataclass(frozen=True)
class ArmKind:
    """How one kind of arm is built and trained. ``build(spec, ctx) -> (model, size facts)``;
    ``train(model, spec, ctx, lr, on_checkpoint)``; ``lrs``: its default grid; ``locator``: whether it is
    tied to a located circuit (``KIND@LOCATOR``); ``adapter``: whether its weights form a PEFT adapter."""

    build: Callable[["ArmSpec", ArmContext], tuple[nn.Module, dict[str, Any]]] | None
    train: Callable[[nn.Module, "ArmSpec", ArmContext, float, Checkpoint], None] | None
    lrs: tuple[float, ...] = CIRCUIT_LRS
    locator: bool = False
    adapter: bool = True


@dataclass(frozen=True)
class ArmSpec:
    """One arm: its ``kind`` (a key of :data:`ARM_KINDS`) and, for kinds tied to a circuit, the ``locator``."""

    kind: str
    locator: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.locator}" if self.locator else self.kind

    @property
    def spec(self) -> ArmKind:
        return ARM_KINDS[self.kind]


def parse_arms(text: str, default_locator: str, locators: Sequence[str]) -> list[ArmSpec]:
    """``--arms``: comma-separated ``KIND`` or ``KIND@LOCATOR`` (the locator defaults to ``default_locator``
    for kinds tied to a circuit); refuses unknown kinds and locators, duplicates, and an empty list."""
    arms = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        kind, _, locator = item.partition("@")
        if kind not in ARM_KINDS:
            raise CircuitPeftError(f"--arms: unknown arm {kind!r}; choose from {', '.join(ARM_KINDS)}")
        if locator and not ARM_KINDS[kind].locator:
            raise CircuitPeftError(f"--arms: {kind!r} takes no locator (got {item!r})")
        if ARM_KINDS[kind].locator:
            locator = locator or default_locator
            if locator not in locators:
                raise CircuitPeftError(f"--arms {item}: unknown locator {locator!r}; choose from {', '.join(locators)}")
        arms.append(ArmSpec(kind, locator or None))
    names = [a.name for a in arms]
    if not arms or len(set(names)) != len(names):
        raise CircuitPeftError(f"--arms: name each arm once, at least one (got {text!r})")
    return arms


def _adapter_config(ctx: ArmContext) -> Callable[[Any], Any]:
    from ..recipe.stages.fit import adapter_config

    return lambda circuit: adapter_config(circuit, ctx.config)


def _build_located(spec: ArmSpec, ctx: ArmContext) -> tuple[nn.Module, dict[str, Any]]:
    from ..recipe.controls import seeded_peft_model
    from ..tuner import circuit_size

    config = _adapter_config(ctx)(ctx.circuit(spec.locator))
    model = seeded_peft_model(ctx.load_model(), config, ctx.config.seed)
    size = circuit_size(config, model)
    return model, {"trainable_params": size["trainable_params"], "components": size["components"]}


def _control_builder(control: str) -> Callable[[ArmSpec, ArmContext], tuple[nn.Module, dict[str, Any]]]:
    def build(spec: ArmSpec, ctx: ArmContext) -> tuple[nn.Module, dict[str, Any]]:
        from ..recipe.controls import control_model

        circuit = ctx.circuit(spec.locator) if spec.locator else None
        return control_model(control, ctx.load_model(), circuit, _adapter_config(ctx), ctx.config.seed)
    return build


def _build_full(spec: ArmSpec, ctx: ArmContext) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh base model, every weight trainable, in float32 whatever ``--dtype`` says
    (:meth:`~circuit_peft.models.LoadSpec.for_full_training`)."""
    from ..models import LoadSpec, load_model

    load = getattr(ctx.config, "load", None)
    if load is None:
        model = ctx.load_model()
    else:
        model = load_model(ctx.model_name, spec=LoadSpec.of(load).for_full_training(f"arm {spec.name}", print))
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"trainable_params": sum(p.numel() for p in model.parameters())}


def train_sft_arm(model: nn.Module, spec: ArmSpec, ctx: ArmContext, lr: float, on_checkpoint: Checkpoint) -> None:
    """The recipe's pivotal SFT at ``lr`` (one cosine schedule over the whole run), ``on_checkpoint`` called at
    ``ctx.checkpoints`` evenly spaced optimizer steps (the last one at the end)."""
    import shutil

    from ..recipe.examples import training_examples
    from ..recipe.sft import train_sft

    examples = training_examples(ctx.tokenizer, ctx.rows, ctx.style, ctx.config)
    trainer_dir = ctx.workdir / "trainer"
    train_sft(model, ctx.tokenizer, examples, replace(ctx.config.sft, learning_rate=lr), str(trainer_dir),
              style=ctx.style, progress=True, callbacks=[checkpoint_callback(ctx.checkpoints, on_checkpoint)])
    shutil.rmtree(trainer_dir, ignore_errors=True)


def checkpoint_steps(total: int, checkpoints: int) -> list[int]:
    """``checkpoints`` evenly spaced steps of ``total`` (1/K, 2/K, ..., K/K, rounded up, distinct, >= 1)."""
    return sorted({max(1, -(-total * k // checkpoints)) for k in range(1, checkpoints + 1)})


def checkpoint_callback(checkpoints: int, on_checkpoint: Checkpoint):
    """A ``TrainerCallback`` that calls ``on_checkpoint(model, step)`` after the optimizer steps of
    :func:`checkpoint_steps` of the run's ``max_steps``."""
    from transformers import TrainerCallback

    class _Checkpoints(TrainerCallback):
        steps: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.steps = checkpoint_steps(state.max_steps, checkpoints)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in self.steps:
                on_checkpoint(model, state.global_step)

    return _Checkpoints()


ARM_KINDS: dict[str, ArmKind] = {
    "base": ArmKind(build=None, train=None, lrs=(), adapter=False),
    "located": ArmKind(_build_located, train_sft_arm, locator=True),
    "twin": ArmKind(_control_builder("random_layer"), train_sft_arm, locator=True),
    "lora": ArmKind(_control_builder("lora"), train_sft_arm),
    "lora_matched": ArmKind(_control_builder("lora_matched"), train_sft_arm, locator=True),
    "full": ArmKind(_build_full, train_sft_arm, lrs=FULL_LRS, adapter=False),
}


def register_arm_kind(name: str, kind: ArmKind) -> None:
    """Add an arm kind (e.g. ``cca_mask``, ``cca_nomask``): ``--arms`` and :func:`parse_arms` then accept it."""
    if name in ARM_KINDS or not name.isidentifier():
        raise CircuitPeftError(f"arm kind {name!r} exists or is not a plain name")
    ARM_KINDS[name] = kind


def default_comparisons(arms: Sequence[ArmSpec]) -> list[tuple[str, str]]:
    """Each located circuit against its twin, against LoRA r=16 and against its matched LoRA (those run)."""
    names = {a.name for a in arms}
    out = []
    for a in arms:
        if a.kind == "located":
            for other in (f"twin@{a.locator}", "lora", f"lora_matched@{a.locator}"):
                if other in names:
                    out.append((a.name, other))
    return out


__all__ = ["ARM_KINDS", "ArmContext", "ArmKind", "ArmSpec", "CIRCUIT_LRS", "FULL_LRS", "checkpoint_callback",
           "checkpoint_steps", "default_comparisons", "parse_arms", "register_arm_kind", "train_sft_arm"]
