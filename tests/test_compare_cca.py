"""The CCA arms of ``compare`` (cca_mask, cca_nomask, cca_twin, cca_sft) on a tiny model: one shared mining and
DCM mask per seed, the update measured at the comparison's checkpoints, the paper's best validated step saved."""

import json
from dataclasses import asdict

import torch

from circuit_peft.compare import ARM_KINDS, ArmContext, parse_arms
from circuit_peft.compare import cca_arms
from circuit_peft.compare.cca_arms import CCA_DIR, cca_preparation, cca_settings
from circuit_peft.models import load_model, load_tokenizer, tiny_model
from circuit_peft.recipe import TrainConfig
from circuit_peft.recipe.rates import load_weights, save_weights


def _context(tmp_path, validations):
    tok = load_tokenizer("smollm2")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    rows = [{"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]

    def validate(model):
        validations.append(1)
        return float(len(validations) % 3)  # a score that changes, so the best step is not simply the last

    return ArmContext(str(tmp_path / "m"), tok, "text", rows, TrainConfig(max_new_tokens=2, seed=3), lambda _: None,
                      3, tmp_path / "scratch", lambda: load_model(str(tmp_path / "m")), folder=tmp_path / "run",
                      validate=validate, measure=lambda m: {"val_acc": 0.5})


def _seed_mining(ctx):
    """Records as the miner writes them (a random tiny model never flips an answer, so none would be mined)."""
    folder = ctx.folder / CCA_DIR / f"mining_seed{ctx.config.seed}"
    folder.mkdir(parents=True)
    (folder / "mining_config.json").write_text(json.dumps(asdict(cca_settings(ctx).mining)))
    g = torch.Generator().manual_seed(0)
    records = [{"context_ids": torch.randint(3, 500, (6,), generator=g).tolist(), "desired_id": 20 + i,
                "undesired_id": 60 + i, "problem_id": f"p{i}"} for i in range(6)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "progress.jsonl").write_text("".join(json.dumps(
        {"problem_id": f"p{i}", "status": "mined", "greedy_correct": False, "n_records": 1}) + "\n" for i in range(6)))


def test_cca_arms_share_one_mask_and_are_measured_at_checkpoints(tmp_path):
    validations = []
    ctx = _context(tmp_path, validations)
    _seed_mining(ctx)
    records, circuit = cca_preparation(ctx)
    assert len(records) == 6 and circuit.components
    assert (ctx.folder / CCA_DIR / "dcm_seed3.json").exists()
    stats = json.loads((ctx.folder / CCA_DIR / "dcm_seed3_stats.json").read_text())
    assert stats["records"] == 6 and stats["kept"] == len(circuit.components)
    # 6 records are one DCM step an epoch: too few to drop a mask below 0.5; a smaller mask as if DCM had learnt it
    small = circuit.top(k=12)
    small.save(ctx.folder / CCA_DIR / "dcm_seed3.json")
    cca_arms._PREPARED.clear()
    assert cca_preparation(ctx)[1].components == small.components

    arms = {a.kind: a for a in parse_arms("cca_mask,cca_nomask,cca_twin,cca_sft", "gradient", ("gradient",))}
    trained = {}
    for kind in ("cca_mask", "cca_twin", "cca_nomask"):
        arm = arms[kind]
        model, size = ARM_KINDS[kind].build(arm, ctx)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps = []
        saved = {}

        def on_checkpoint(m, step):
            steps.append(step)
            if ARM_KINDS[kind].adapter:  # as compare saves a point, to rebuild the chosen arm from it later
                save_weights(m, tmp_path / f"{kind}_step{step}.safetensors")
                saved[step] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

        ARM_KINDS[kind].train(model, arm, ctx, 1e-2, on_checkpoint)
        assert steps == [17, 34, 50]  # 1/3, 2/3, 3/3 of the preset's 50 steps
        rule = json.loads((ctx.folder / CCA_DIR / f"{kind}_lr0.01_seed3.json").read_text())
        assert rule["best_step"] in {2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40, 45, 50} and rule["point"] == {"val_acc": 0.5}
        assert rule["records"] == 6 and len(rule["history"]) == 51
        trained[kind] = (model, size, before)
        if saved:  # compare's _save_chosen: the arm rebuilt fresh, a checkpoint's weights loaded into it
            rebuilt, _ = ARM_KINDS[kind].build(arm, ctx)
            load_weights(rebuilt, tmp_path / f"{kind}_step34.safetensors")
            got = {n: p for n, p in rebuilt.named_parameters() if p.requires_grad}
            assert got.keys() == saved[34].keys() and all(torch.equal(got[n], saved[34][n]) for n in got)
    model, size, before = trained["cca_nomask"]  # every weight is a candidate, and the embedding moved
    assert size["trainable_params"] == sum(p.numel() for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("layers" in n for n in changed)
    mask, twin = trained["cca_mask"][1], trained["cca_twin"][1]
    assert mask["trainable_params"] == twin["trainable_params"]  # the twin: as many components of each kind
    adapter = trained["cca_mask"][0].peft_config["default"]
    assert sorted(adapter.component_list()) == sorted(small.components)
    twin_list = trained["cca_twin"][0].peft_config["default"].component_list()
    assert sorted(twin_list) != sorted(small.components) and len(twin_list) == len(small.components)

    sft = arms["cca_sft"]
    model, size = ARM_KINDS["cca_sft"].build(sft, ctx)
    assert size["trainable_params"] == mask["trainable_params"]  # the mask's adapter, projections="paper"
    assert ARM_KINDS["cca_sft"].lrs == (3e-4, 1e-3, 3e-3) and ARM_KINDS["cca_mask"].lrs == (1e-4, 1e-3)
