"""The amplification update: train only the located circuit on the contrastive logit difference.

Loss at the last context position of each record (``margin = z[desired] - z[undesired]``):

* ``"logit_diff"`` (the paper's): ``-mean(margin)``; unbounded, so pair it with validation.
* ``"logsigmoid"`` (our bounded variant): ``mean(-log sigmoid(margin))``.
* ``"capped"`` (our bounded variant): ``-mean(min(margin, margin_cap))``.

Paper defaults: full-batch gradient descent (``optimizer="sgd"``, gradients accumulated over
micro-batches, so the step is the full-batch one), lr 1e-4, up to 100 steps, keep the step with
the best validation score (step 0 = the unchanged model is a candidate too). ``optimizer="adam"``
and ``patience`` (early stopping after that many evaluations without improvement) are options.

Speed: the records are fixed and every layer below the lowest trained component is frozen, so the
hidden states entering that layer are computed once
(:func:`~circuit_peft.interventions.capture_layer_input`) and each step runs only the layers above
(:func:`~circuit_peft.interventions.start_at_layer`); ``cache_lower_layers=False`` runs the plain
loop (same losses, see :func:`measure_update_speedup`). The prompt prefix that every record shares (system
message, few-shot examples) runs once per micro-batch and its KV cache is repeated for the rows
(``share_prompt_prefix``; the same losses and gradients up to float rounding: the update runs in eval mode, so
no dropout acts on it).

What is trained (``UpdateConfig.target``): ``"circuit"`` (the located circuit's slices, the paper's
masked update), ``"twin"`` (its layer-matched random twin: the same kinds and counts in the same layers,
:func:`~circuit_peft.locate.controls.random_circuit`), ``"projections"`` (every row of the circuit's
projections in every layer; ``mask=False``) or ``"all_weights"`` (every parameter of the model, as the
paper's code does with ``update_using_mask=False``). :meth:`UpdateConfig.paper` is the paper's setting.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_arch, unwrap_model
from ..circuit import Circuit
from ..errors import CircuitPeftError
from ..interventions import capture_layer_input, forward_until, start_at_layer
from ..batching import length_batches, pad_token_id, to_device
from ..prefix import prefix_kv_cache, repeat_cache, sharable_prefix_ids
from ..taskdata.losses import MARGIN_LOSSES, last_logits, logit_margins, margin_loss
from ..taskdata.records import collate_records, validate_records
from ..tuner import CircuitConfig, circuit_size

logger = logging.getLogger(__name__)

UPDATE_LOSSES: tuple[str, ...] = MARGIN_LOSSES  # taskdata.losses.margin_loss
UPDATE_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
UPDATE_TARGETS: tuple[str, ...] = ("circuit", "twin", "projections", "all_weights")
# The paper's code validates after every second step in the first ten, then every eval_interval steps.
PAPER_EARLY_EVALS: tuple[int, ...] = (2, 4, 6, 8)
Validator = Callable[[nn.Module], float]


@dataclass
class UpdateConfig:
    """Settings of :func:`amplify_update` (paper defaults unless marked "our choice")."""

    steps: int = 100
    lr: float = 1e-4
    optimizer: Literal["sgd", "adam"] = "sgd"
    loss: Literal["logit_diff", "logsigmoid", "capped"] = "logit_diff"
    margin_cap: float = 5.0  # our choice, for loss="capped" (logits)
    eval_every: int = 10  # our choice: validation every 10 steps (and at step 0 and the last step)
    patience: int | None = None  # evaluations without improvement before stopping; None: run all steps
    keep_best: bool = True
    micro_batch_size: int = 16  # memory only: gradients are accumulated to the full-batch gradient
    cache_lower_layers: bool = True
    share_prompt_prefix: bool = True  # run the records' shared prompt prefix once per micro-batch (same losses)
    min_shared_prefix: int = 16  # tokens: a shorter shared prefix runs inside every record
    projections: str | dict[str, list[str]] = "paper"  # used when a Circuit (not a config) is given
    target: Literal["circuit", "twin", "projections", "all_weights"] = "circuit"  # what is trained (module doc)
    twin_seed: int = 0  # target="twin": the seed of the random twin
    keep_start: bool = True  # our choice: step 0 (the unchanged model) may be the kept step; the paper's code: no
    eval_also: tuple[int, ...] = ()  # more steps to validate at, besides every eval_every

    @classmethod
    def paper(cls, lr: float = 1e-4, target: str = "circuit", **overrides: Any) -> "UpdateConfig":
        """The paper's update (its code's defaults): full-batch gradient descent at ``lr`` (1e-4; the issue's grid
        adds 1e-3) on the unbounded logit difference, 50 steps, validation after steps 2, 4, 6, 8 and every 5th,
        the best validated step kept (step 0 is not a candidate), no early stop, ``projections="paper"``.
        ``target``: ``"circuit"`` (with mask), ``"all_weights"`` (without mask) or ``"twin"``."""
        settings = dict(steps=50, lr=lr, optimizer="sgd", loss="logit_diff", eval_every=5, eval_also=PAPER_EARLY_EVALS,
                        patience=None, keep_best=True, keep_start=False, projections="paper", target=target)
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        self.eval_also = tuple(int(s) for s in self.eval_also)
        if self.target not in UPDATE_TARGETS:
            raise CircuitPeftError(f"target must be one of {UPDATE_TARGETS}, got {self.target!r}")
        if any(s < 1 for s in self.eval_also):
            raise CircuitPeftError(f"eval_also: steps must be >= 1, got {self.eval_also!r}")
        if self.loss not in UPDATE_LOSSES:
            raise ValueError(f"loss must be one of {UPDATE_LOSSES}, got {self.loss!r}")
        if self.optimizer not in UPDATE_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {UPDATE_OPTIMIZERS}, got {self.optimizer!r}")
        if self.steps < 1 or self.eval_every < 1 or self.micro_batch_size < 1 or self.min_shared_prefix < 1:
            raise ValueError("steps, eval_every, micro_batch_size and min_shared_prefix must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")


@dataclass
class UpdateResult:
    """The trained PEFT model and how the run went.

    ``history``: one dict per step (``step``, ``loss``, ``margin`` = mean logit difference on the
    training records before that step's update, ``val`` when validated, ``seconds``).
    ``best_step``: the step whose weights the model holds (0 = unchanged). ``size``:
    :func:`~circuit_peft.tuner.circuit_size` of the trained config.
    """

    model: nn.Module  # a PeftModel; the model itself for target="all_weights"
    config: CircuitConfig | None  # None for target="all_weights"
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_val: float | None = None
    initial_margin: float = float("nan")
    final_margin: float = float("nan")
    size: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    kept: str = ""  # which step the model holds and why: :func:`kept_step_rule`

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_step": self.best_step, "best_val": self.best_val,
                "initial_margin": self.initial_margin, "final_margin": self.final_margin, "size": self.size,
                "seconds": self.seconds, "kept": self.kept, "components": self.config.components if self.config else "all"}


def circuit_config_for(
    model: nn.Module, circuit: Circuit | CircuitConfig, mask: bool = True, projections: Any = "paper"
) -> CircuitConfig:
    """The adapter config the update trains: the circuit's (``mask=True``) or every component of
    the circuit's kinds in every layer (``mask=False``, the "without mask" ablation)."""
    if isinstance(circuit, Circuit):
        if not circuit.components:
            raise ValueError("the circuit is empty: locate with a weaker sparsity penalty or keep more components")
        config = circuit.to_config(projections=projections)
    elif isinstance(circuit, CircuitConfig):
        config = copy.deepcopy(circuit)  # get_peft_model fills in fields; leave the caller's config alone
    else:
        raise ValueError(f"circuit must be a Circuit or a CircuitConfig, got {type(circuit).__name__}")
    if mask:
        return config
    kinds = tuple(sorted({c.kind for c in config.component_list()}))
    every = get_arch(model).all_components(kinds)
    return CircuitConfig.from_components(every, projections=config.projections)


class _Objective:
    """Full-batch loss and gradient on fixed records, optionally from cached lower-layer states and with the
    records' shared prompt prefix run once per micro-batch."""

    def __init__(self, model: PeftModel, rows: list[dict], lowest: int, cfg: UpdateConfig, pad: int):
        self.model, self.cfg = model, cfg
        self.base = unwrap_model(model)
        self.arch = get_arch(self.base)
        self.n = len(rows)
        device = next(model.parameters()).device
        prefix = _shared_prompt_prefix([r["context_ids"] for r in rows], cfg, model)
        self.prefix = torch.tensor([prefix], device=device) if prefix else None
        groups = length_batches([len(r["context_ids"]) for r in rows], cfg.micro_batch_size)
        self.batches = [to_device(collate_records([rows[i] for i in g], pad, len(prefix)), device) for g in groups]
        self.lowest = lowest if cfg.cache_lower_layers else 0
        self.hidden: list[torch.Tensor | None] = [None] * len(self.batches)
        if self.lowest > 0:
            with torch.no_grad():
                plain = prefix_kv_cache(self.base, self.prefix) if prefix else None  # frozen layers < lowest: exact
                for i, b in enumerate(self.batches):
                    cache = {"past_key_values": repeat_cache(plain, len(b["desired"]))} if prefix else {}
                    with capture_layer_input(self.base, self.lowest, self.arch) as store:
                        forward_until(self.base, self.lowest, self.arch, **self._inputs(b), **cache)
                    self.hidden[i] = store["hidden"]

    @staticmethod
    def _inputs(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}

    def margins(self, i: int) -> torch.Tensor:
        """``z[desired] - z[undesired]`` (B,) at the last position of micro-batch ``i``; the shared prefix (every
        layer, so that the cache is whole) runs first, its cache repeated for the rows; autograd carries the
        rows' gradients back through it."""
        b = self.batches[i]
        cache = {}
        if self.prefix is not None:
            cache["past_key_values"] = prefix_kv_cache(self.model, self.prefix, rows=len(b["desired"]))  # adapted
        ctx = start_at_layer(self.base, self.lowest, self.hidden[i], self.arch) if self.lowest > 0 else nullcontext()
        with ctx:
            logits = last_logits(self.model, self._inputs(b), 1, **cache)[:, -1].float()
        return logit_margins(logits, b["desired"], b["undesired"])

    def backward(self) -> tuple[float, float]:
        """Accumulate the full-batch gradient; return (mean loss, mean margin)."""
        total_loss, total_margin = 0.0, 0.0
        for i in range(len(self.batches)):
            m = self.margins(i)
            loss = margin_loss(m, self.cfg.loss, self.cfg.margin_cap).sum() / self.n
            loss.backward()
            total_loss += float(loss.detach())
            total_margin += float(m.detach().sum())
        return total_loss, total_margin / self.n

    @torch.no_grad()
    def mean_margin(self) -> float:
        return sum(float(self.margins(i).sum()) for i in range(len(self.batches))) / self.n


def _shared_prompt_prefix(contexts: list[list[int]], cfg: UpdateConfig, model: nn.Module | None = None) -> list[int]:
    """The ids every context starts with (leaving each at least one), if ``cfg.share_prompt_prefix``, at least
    ``cfg.min_shared_prefix`` long and sharing is exact for ``model`` (:func:`~circuit_peft.prefix.sharable_prefix_ids`);
    else ``[]`` (every record runs whole)."""
    return sharable_prefix_ids(model, contexts, cfg.min_shared_prefix) if cfg.share_prompt_prefix else []


def _target_circuit(circuit: Circuit | CircuitConfig | None, cfg: UpdateConfig) -> Circuit | CircuitConfig | None:
    """The circuit the update trains: ``circuit`` itself, or for ``target="twin"`` its layer-matched random twin."""
    if cfg.target != "twin":
        return circuit
    if not isinstance(circuit, Circuit):
        raise CircuitPeftError("target='twin' draws the random twin of a located Circuit (it needs the circuit's "
                               f"layers and the model's sizes); got {type(circuit).__name__}")
    from ..locate.controls import random_circuit

    return random_circuit(circuit, "layer", seed=cfg.twin_seed)


def _all_weights_model(model: nn.Module) -> tuple[nn.Module, None, dict[str, Any]]:
    """``model`` itself with every parameter trainable (the paper's update without a mask) and its size."""
    if isinstance(model, PeftModel):
        raise CircuitPeftError("target='all_weights' trains the model's own weights: pass the base model, not a PeftModel")
    arch = get_arch(model)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise CircuitPeftError("target='all_weights' (--target all_weights) trains every weight and a quantized "
                               "model's cannot train: load it without --load-in-4bit")
    if any(p.dtype != torch.float32 for p in model.parameters()):  # no float32 master copy: updates would round away
        logging.getLogger(__name__).warning("target='all_weights': the model's weights are cast to float32 to train")
        model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    total = sum(arch.num_components(k) for k in ("q", "k", "v", "mlp")) * arch.dims.n_layers
    return model, None, {"components": total, "total_components": total, "component_fraction": 1.0,
                         "trainable_params": n, "total_params": n, "param_fraction": 1.0}


def _circuit_model(model: nn.Module, circuit: Circuit | CircuitConfig | None, mask: bool, projections: str,
                   adapter_name: str) -> tuple[PeftModel, CircuitConfig, dict[str, Any]]:
    """The PEFT model whose circuit adapter the update trains, its config and size: ``model`` wrapped
    with ``circuit``'s adapter, or ``model`` itself when it is a ``PeftModel`` holding one."""
    if isinstance(model, PeftModel):
        if circuit is not None or not mask:
            raise ValueError("model is a PeftModel: its adapter is trained as it is; pass circuit=None and mask=True "
                             "(or pass the base model)")
        if adapter_name not in model.peft_config or not isinstance(model.peft_config[adapter_name], CircuitConfig):
            raise ValueError(f"the PeftModel has no circuit adapter named {adapter_name!r} "
                             f"(adapters: {sorted(model.peft_config)})")
        config = model.peft_config[adapter_name]
        model.set_adapter(adapter_name)
        return model, config, circuit_size(config, model.get_base_model())
    if circuit is None:
        raise ValueError("circuit is None: pass a Circuit or CircuitConfig, or a PeftModel holding the adapter")
    config = circuit_config_for(model, circuit, mask=mask, projections=projections)
    size = circuit_size(config, model)
    return get_peft_model(model, config, adapter_name=adapter_name), config, size


def amplify_update(
    model: nn.Module,
    records: Any,
    circuit: Circuit | CircuitConfig | None,
    validate: Validator | None = None,
    config: UpdateConfig | None = None,
    mask: bool = True,
    tokenizer: Any = None,
    adapter_name: str = "default",
    progress: bool = True,
    on_step: Callable[[nn.Module, int], None] | None = None,
    **overrides: Any,
) -> UpdateResult:
    """Train a circuit adapter on contrastive records; return the PEFT model holding the best step.

    Args:
        model: the base model (it is wrapped in place by ``get_peft_model``), or a ``PeftModel`` whose
            circuit adapter ``adapter_name`` is trained in place (then ``circuit`` is None; the adapter
            becomes the active one and its config's projections are used).
        records: ``{"context_ids", "desired_id", "undesired_id", "problem_id"}`` rows (list or Dataset).
        circuit: a located :class:`~circuit_peft.circuit.Circuit` (turned into a config with
            ``config.projections``, default ``"paper"``: q/k/v rows and up_proj rows) or a ready
            :class:`CircuitConfig`; None with a ``PeftModel``.
        validate: ``model -> score`` (higher is better), e.g. :func:`accuracy_validator`; None keeps
            the last step (no selection).
        mask: False is ``target="projections"`` (every row of the circuit's projections in every layer).
        on_step: called as ``on_step(model, k)`` after the k-th optimizer step (after that step's validation),
            e.g. to measure checkpoints; the model must be left as it was given.
        overrides: :class:`UpdateConfig` fields (``target`` picks what is trained: see the module doc).

    Raises ``ValueError`` for an empty circuit, empty or malformed records.
    """
    cfg = config or UpdateConfig()
    if overrides:
        cfg = UpdateConfig(**{**asdict(cfg), **overrides})
    if not mask:
        if cfg.target not in ("circuit", "projections"):
            raise CircuitPeftError(f"mask=False is target='projections'; it contradicts target={cfg.target!r}")
        cfg = replace(cfg, target="projections")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    rows = validate_records(records, get_arch(base).dims.vocab_size, model=base)  # before the model is wrapped
    start = time.perf_counter()
    if cfg.target == "all_weights":
        peft_model, peft_config, size = _all_weights_model(model)
    else:
        peft_model, peft_config, size = _circuit_model(model, _target_circuit(circuit, cfg),
                                                       cfg.target != "projections", cfg.projections, adapter_name)
    lowest = min(peft_config.layers()) if peft_config is not None else 0
    peft_model.eval()  # no dropout; gradients still flow
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter has no trainable parameters; check the circuit and projections")
    objective = _Objective(peft_model, rows, lowest, cfg, pad_token_id(base, tokenizer))
    best = _BestStep(params)
    history = _update_loop(peft_model, objective, params, cfg, validate, best, progress, on_step)
    kept = kept_step_rule(validate, cfg)
    if kept.startswith("last"):
        best.step = history[-1]["step"]
    else:
        best.restore()
    final_margin = objective.mean_margin() if best.step != history[-1]["step"] else history[-1]["margin"]
    return UpdateResult(
        model=peft_model, config=peft_config, history=history, best_step=best.step, best_val=best.val,
        initial_margin=history[0]["margin"], final_margin=final_margin, size=size,
        seconds=time.perf_counter() - start, kept=kept,
    )


def kept_step_rule(validate: Validator | None, cfg: UpdateConfig) -> str:
    """THE rule for which step an update returns (every caller states it by what it passes): the best validated
    step when a validator is given and ``cfg.keep_best`` (step 0 a candidate only with ``cfg.keep_start``), else
    the last step. ``amplify`` validates on held-out problems; ``train --update cca`` passes no validator."""
    if validate is None or not cfg.keep_best:
        return "last step (no validation)" if validate is None else "last step (keep_best=False)"
    return "best validated step" + ("" if cfg.keep_start else " after step 0")


class _BestStep:
    """The best validated step so far: its score, step, a copy of the trainable parameters, and how
    many validations have passed without beating it."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.val: float | None = None
        self.step, self.since, self.state = 0, 0, self._snapshot()

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def observe(self, step: int, val: float) -> None:
        """Record a validation score at ``step`` (keeps a copy of the parameters when it is the best)."""
        if self.val is None or val > self.val:
            self.val, self.step, self.state, self.since = val, step, self._snapshot(), 0
        else:
            self.since += 1

    def restore(self) -> None:
        """Put the best step's parameters back."""
        with torch.no_grad():
            for p, saved in zip(self.params, self.state):
                p.copy_(saved)


def _update_loop(peft_model: nn.Module, objective: "_Objective", params: list[torch.Tensor], cfg: UpdateConfig,
                 validate: Validator | None, best: _BestStep, progress: bool,
                 on_step: Callable[[nn.Module, int], None] | None = None) -> list[dict[str, Any]]:
    """Up to ``cfg.steps`` optimiser steps, validating every ``cfg.eval_every`` (``on_step(model, step)`` after
    each step's validation); the per-step history."""
    opt = (torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.Adam(params, lr=cfg.lr))
    history: list[dict[str, Any]] = []
    bar = tqdm(range(cfg.steps + 1), desc="amplify update", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"step": step}
        if validate is not None and (step % cfg.eval_every == 0 or step == cfg.steps or step in cfg.eval_also):
            entry["val"] = float(validate(peft_model))
            if step > 0 or cfg.keep_start:
                best.observe(step, entry["val"])
        if on_step is not None and step > 0:
            on_step(peft_model, step)
        if step == cfg.steps or (cfg.patience is not None and best.since >= cfg.patience):
            entry["margin"] = objective.mean_margin()
            history.append(entry)
            break
        opt.zero_grad(set_to_none=True)
        loss, margin = objective.backward()
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"the update loss became {loss} at step {step}; lower lr or use loss='logsigmoid'")
        opt.step()
        entry.update(loss=loss, margin=margin, seconds=time.perf_counter() - t0)
        history.append(entry)
        bar.set_postfix(margin=f"{margin:.2f}", **({"val": f"{entry['val']:.3f}"} if "val" in entry else {}))
    bar.close()
    return history


def measure_update_speedup(
    model: nn.Module, records: Any, circuit: Circuit | CircuitConfig, steps: int = 3, tokenizer: Any = None,
    **overrides: Any,
) -> dict[str, float]:
    """Seconds per update step with and without the lower-layer cache and the shared prompt prefix (and their
    ratio; ``benchmarks/update_step.py`` times each separately).

    Runs ``steps`` steps each way (lr as configured) on ``model`` and removes the adapter
    afterwards, so ``model`` is returned to its original weights. Includes the one-off caching
    pass in the cached time (``cache_s``).
    """
    times = {}
    for cached in (False, True):
        t0 = time.perf_counter()
        result = amplify_update(model, records, circuit, None, tokenizer=tokenizer, progress=False, steps=steps,
                                cache_lower_layers=cached, share_prompt_prefix=cached, **overrides)
        total = time.perf_counter() - t0
        per_step = sum(h.get("seconds", 0.0) for h in result.history) / steps
        times["cached_step_s" if cached else "plain_step_s"] = per_step
        if cached:
            times["cache_s"] = total - per_step * steps
        result.model.unload()
    times["speedup"] = times["plain_step_s"] / times["cached_step_s"]
    return times


def accuracy_validator(tokenizer: Any, problems: Sequence[dict[str, Any]], **eval_kwargs: Any) -> Validator:
    """A ``model -> accuracy`` function on held-out ``problems`` (greedy, batched), for ``validate=``.

    ``eval_kwargs`` go to :func:`~circuit_peft.evaluate.accuracy.evaluate_accuracy` (``style``,
    ``shots``, ``max_new_tokens``, ...). Raises ``ValueError`` if ``problems`` is empty.
    """
    from ..evaluate.accuracy import evaluate_accuracy

    problems = list(problems)
    if not problems:
        raise ValueError("the validation set is empty: give a few held-out problems (e.g. 32) to pick the best step")
    eval_kwargs.setdefault("progress", False)

    def validate(model: nn.Module) -> float:
        return evaluate_accuracy(model, tokenizer, problems, **eval_kwargs).accuracy

    return validate


def margin_validator(records: Any, micro_batch_size: int = 16, tokenizer: Any = None) -> Validator:
    """A cheap ``model -> mean logit difference`` on held-out contrastive records, for ``validate=``."""
    rows = list(records)
    if not rows:
        raise ValueError("the validation set is empty: give held-out contrastive records")

    @torch.no_grad()
    def validate(model: nn.Module) -> float:
        base = unwrap_model(model)
        checked = validate_records(rows, get_arch(base).dims.vocab_size, model=base)
        objective = _Objective(model, checked, 0, UpdateConfig(micro_batch_size=micro_batch_size),
                               pad_token_id(base, tokenizer))
        return objective.mean_margin()

    return validate
