"""benchmarks/recipes.py end to end on a tiny model: two arms, two rates, two seeds, through the library's rate grid."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import recipes  # noqa: E402


def _argv(model_dir: Path, work: Path, lrs: str, seeds: str) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(ROOT / "tests" / "data"), "--mmlu-subjects",
            "elementary_mathematics", "--seeds", seeds, "--n-train", "4", "--n-val", "3", "--n-test", "3",
            "--n-transfer", "2", "--max-new-tokens", "4", "--epochs", "1", "--batch-size", "2", "--fractions", "0.1",
            "--locators", "grad", "--arms", "located_grad@0.1,lora16", "--circuit-lrs", lrs, "--mmlu-limit", "2",
            "--truthfulqa-limit", "2", "--kl-chunks", "1", "--threads", "1", "--work-dir", str(work)]


@pytest.mark.slow  # three runs of the whole driver, ~20 s on 1 thread: left out of `make test-fast`
def test_recipes_driver_two_arms_two_rates_on_a_tiny_model(tmp_path, capsys):
    """Seed 0 chooses each arm's rate on validation (the library's fit_on_grid; a tie keeps the grid's first rate)
    and is measured holding that rate's weights, not the last rate's; seed 1 trains at the chosen rate; the arm
    files and the summary keep their keys; a re-run reuses every saved arm."""
    from circuit_peft.models import load_tokenizer, tiny_model

    tok = load_tokenizer("smollm2")
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    work = tmp_path / "work"
    res = recipes.main(_argv(model_dir, work, "1e-3,3e-2", "0,1"))
    arms_dir = next(work.glob("arms-*"))
    located = json.loads((arms_dir / "located_grad@0.1-seed0.json").read_text())
    assert located["val_by_lr"] == {"0.001": 0.0, "0.03": 0.0}  # a random model answers nothing right: a tie
    assert located["lr"] == 1e-3 and located["val_acc"] == 0.0 and "val_loss_by_lr" not in located
    assert {"trainable_params", "components", "counts", "layers", "test_acc", "transfer_acc", "kl"} <= set(located)
    later = json.loads((arms_dir / "lora16-seed1.json").read_text())
    assert later["lr"] == json.loads((arms_dir / "lora16-seed0.json").read_text())["lr"] and later["val_by_lr"] == {}
    assert later["lora_dropout"] == 0.0 and not list(arms_dir.glob("grid-*"))  # the grid's weights go once saved
    assert set(res["arms"]) == {"located_grad@0.1", "lora16"} and res["arms"]["lora16"]["seeds"] == [0, 1]
    assert set(res["located_minus"]) == {"lora16"} and res["circuit_params_fraction_of_lora"] < 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["circuit_kl"] == res["circuit_kl"]

    alone = recipes.main(_argv(model_dir, tmp_path / "alone", "1e-3", "0"))  # the chosen rate trained alone
    assert alone["arms"]["located_grad@0.1"]["kl"] == pytest.approx(located["kl"], rel=1e-5)
    capsys.readouterr()
    again = recipes.main(_argv(model_dir, work, "1e-3,3e-2", "0,1"))
    assert json.dumps(again["arms"]) == json.dumps(res["arms"])  # the saved arms (NaN standard errors included)
    assert "validation accuracy" not in capsys.readouterr().out  # reused: no rate trained again


def test_fit_on_grid_full_weights_and_facts(tmp_path):
    """A model trained whole (no adapter) through the rate grid: each rate starts from the initial weights, the
    kept rate's weights are loaded back (tied embeddings included), and what ``train_at`` returns is kept per rate."""
    import torch

    from circuit_peft.models import tiny_model
    from circuit_peft.recipe import RunFolder, fit_on_grid
    from circuit_peft.recipe.rates import FullWeights

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))

    def train_at(model, lr):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return {"norm": float(sum(p.detach().norm() for p in model.parameters()))}

    run = RunFolder(tmp_path / "run", {"model": "tiny"})
    run.open()
    model = tiny_model("llama")
    scores = iter([0.5, 0.2])  # the first rate wins
    choice = fit_on_grid(run, "full", model, train_at, lambda m: next(scores), [0.1, 1.0], print, weights=FullWeights())
    alone = tiny_model("llama")
    facts = train_at(alone, 0.1)
    assert choice.lr == 0.1 and choice.facts == {"0.1": facts, "1": choice.facts["1"]} and choice.facts["1"] != facts
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), alone.state_dict().values()))
