"""Pivotal-weighted SFT step: the trainers' loss paths vs the full-logits weighting they replaced.

One circuit adapter (the top-third circuit of ``adapter_step.py``), one batch of the recipe's own
training rows (few-shot or chat prompt + gold solution, the answer's tokens weighted 5, loss only on
the solution), three loss paths, each through a real trainer's ``training_step`` (forward + backward):

* ``full_logits``: the weighting as ``PivotalWeighting.attach`` did it before issue 11: the model's
  ordinary forward (logits at every position, prompt included) and ``pivotal_weighted_loss``;
* ``pivotal_trainer``: :class:`~circuit_peft.cca.trainers.PivotalTrainer` (``transformers.Trainer``):
  the LM head only at positions whose next token has a label, and the prompt prefix every row shares
  (system message, few-shot examples) run once, its KV cache repeated for the rows;
* ``pivotal_trainer_rows_whole``: the same trainer with ``share_prompt_prefix = False`` (every row runs
  its whole prompt: the trainer before the shared prefix), the peer of the prefix sharing;
* ``pivotal_sft_trainer``: :class:`~circuit_peft.cca.trainers.PivotalSFTTrainer` (``trl.SFTTrainer``):
  TRL's own chunked LM head (never materialises full logits), its metrics kept.

Time: median over ``--steps`` measured steps after ``--warmup``, the three paths in turn; on CPU the
process CPU time with one thread (wall time swings with other jobs), on CUDA wall time. Memory: on
CUDA ``max_memory_allocated`` above the step's start; on CPU the activation bytes autograd saves for
backward (each storage once, the model's weights left out), which is where full logits cost. The losses must agree (same weighted
loss): reported as ``max_loss_rel_diff``.

    python benchmarks/pivotal_step.py --model smollm2
    python benchmarks/pivotal_step.py --model gemma3-270m       # 262k vocabulary: the LM head dominates

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from _bench import saved_for_backward
from adapter_step import circuit_components

PATHS = ("full_logits", "pivotal_trainer", "pivotal_trainer_rows_whole", "pivotal_sft_trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2', 'gemma3-270m', a hub id or a folder")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per path (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class FullLogitsTrainer(Trainer):
    """The pre-issue-11 weighting: full logits from the ordinary forward, then the weighted loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from circuit_peft.taskdata.losses import pivotal_weighted_loss

        weights, undesired = inputs.pop("token_weights"), inputs.pop("undesired_ids", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        loss = pivotal_weighted_loss(outputs.logits, labels, weights, undesired, 0.0, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def training_rows(tokenizer: Any, n: int, seed: int):
    """``n`` pivotal-weighted rows of the recipe (arithmetic problems, the model's prompt style)."""
    from circuit_peft.cca.problems import TASKS, make_problems
    from circuit_peft.taskdata.prompts import default_prompt_style
    from circuit_peft.recipe.sft import gold_examples, pivotal_dataset

    task = TASKS["arithmetic"]
    style = default_prompt_style(tokenizer, log=print)
    problems = make_problems(n, "train", seed=seed, kinds=task["kinds"])
    examples = gold_examples(tokenizer, problems, style, [dict(s) for s in task["shots"]])
    return pivotal_dataset(tokenizer, examples, 5.0, style)


def make_trainer(path: str, model, tokenizer, data, out: str, batch: int):
    """The trainer of loss path ``path`` over ``model`` (shared: the paths take their steps in turn)."""
    from circuit_peft.cca.trainers import PivotalSFTTrainer, PivotalTrainer
    from circuit_peft.cca.trainers import install_pivotal_columns

    common = dict(output_dir=out, per_device_train_batch_size=batch, report_to=[], save_strategy="no",
                  use_cpu=not torch.cuda.is_available())
    if path == "pivotal_sft_trainer":
        from trl import SFTConfig

        return PivotalSFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data,
                                 processing_class=tokenizer)
    args = TrainingArguments(**common)
    if path.startswith("pivotal_trainer"):
        trainer = PivotalTrainer(model=model, args=args, train_dataset=data)
        trainer.share_prompt_prefix = path == "pivotal_trainer"
        return trainer
    trainer = FullLogitsTrainer(model=model, args=args, train_dataset=data)
    install_pivotal_columns(trainer)
    return trainer


def timed_step(trainer, batch: dict[str, torch.Tensor]) -> tuple[float, float, int, float]:
    """One ``training_step``: (wall s, process CPU s, activation bytes saved for backward, loss)."""
    weights = [p.untyped_storage().data_ptr() for p in trainer.model.parameters()]  # not activations
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    wall, cpu = time.perf_counter(), time.process_time()
    items = int((batch["labels"][:, 1:] != -100).sum())
    with saved_for_backward(exclude=weights) as storages:
        loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=items)
    if cuda:
        torch.cuda.synchronize()
        saved = torch.cuda.max_memory_allocated() - start_mem
    else:
        saved = sum(storages.values())
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu, saved, float(loss)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from peft import get_peft_model

    from circuit_peft import CircuitConfig, get_arch, load_model, load_tokenizer
    from circuit_peft.cca.trainers import labelled_positions

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, padding_side="right")
    model = load_model(args.model)
    config = CircuitConfig.from_components(circuit_components(get_arch(model), "top", args.seed))
    model = get_peft_model(model, config)
    if torch.cuda.is_available():
        model.cuda()
    data = training_rows(tokenizer, args.batch, args.seed)
    wall = {p: [] for p in PATHS}
    cpu = {p: [] for p in PATHS}
    memory: dict[str, int] = {}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        trainers = {p: make_trainer(p, model, tokenizer, data, out, args.batch) for p in PATHS}
        batches = {p: next(iter(t.get_train_dataloader())) for p, t in trainers.items()}
        n_positions = int(batches["full_logits"]["input_ids"].numel())
        n_labels = int((batches["full_logits"]["labels"] != -100).sum())
        first_labelled = int(labelled_positions(batches["full_logits"]["labels"])[0])
        shared_prefix = trainers["pivotal_trainer"].shared_prefix_length(
            model.train(), {k: batches["full_logits"][k] for k in ("input_ids", "attention_mask")}, first_labelled)
        for i in range(args.warmup + args.steps):
            for p in PATHS:
                w, c, saved, loss = timed_step(trainers[p], batches[p])
                memory[p], losses[p] = max(memory.get(p, 0), saved), loss
                if i >= args.warmup:
                    wall[p].append(w)
                    cpu[p].append(c)
                print(f"step {i} {p:<20} wall {w:6.2f} s  cpu {c:6.2f} s  saved {saved / 2**20:8.0f} MiB  "
                      f"loss {loss:.5f}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timing = cpu if device == "cpu" else wall
    median = {p: statistics.median(timing[p]) for p in PATHS}
    ref = losses["full_logits"]
    result = {
        "model": args.model, "vocab": model.get_output_embeddings().out_features, "batch": args.batch,
        "positions": n_positions, "labelled_tokens": n_labels, "shared_prefix_tokens": shared_prefix,
        "median_step_s": median, "median_wall_s": {p: statistics.median(wall[p]) for p in PATHS},
        "timing": "process_cpu" if device == "cpu" else "wall",
        "memory_bytes": memory,
        "memory_measure": "cuda_max_allocated" if device == "cuda" else "saved_for_backward",
        "pivotal_trainer_vs_full_logits_time": median["pivotal_trainer"] / median["full_logits"],
        "pivotal_sft_trainer_vs_full_logits_time": median["pivotal_sft_trainer"] / median["full_logits"],
        "shared_prefix_vs_rows_whole_time": median["pivotal_trainer"] / median["pivotal_trainer_rows_whole"],
        "shared_prefix_vs_rows_whole_memory": memory["pivotal_trainer"] / memory["pivotal_trainer_rows_whole"],
        "pivotal_trainer_vs_full_logits_memory": memory["pivotal_trainer"] / memory["full_logits"],
        "pivotal_sft_trainer_vs_full_logits_memory": memory["pivotal_sft_trainer"] / memory["full_logits"],
        "max_loss_rel_diff": max(abs(v - ref) / abs(ref) for v in losses.values()),
        "device": device, "threads": args.threads, "steps": args.steps,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
