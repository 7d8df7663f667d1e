"""The circuit adapter on the real SmolLM2-135M-Instruct."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, save_as_lora

from circuit_peft import CircuitConfig, circuit_size, get_arch, load_model

TESTS = Path(__file__).parent


@pytest.mark.slow
def test_smollm2_circuit_trains_exact_slices_and_round_trips(smollm2, tmp_path):
    _, tok = smollm2
    row = json.loads((TESTS / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    batch = tok([row["question"] + " " + row["answer"]], return_tensors="pt", truncation=True, max_length=48)
    ids = batch["input_ids"]

    base = load_model("smollm2")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    # 9 query heads / 3 key-value heads / 1536 neurons per layer, 30 layers
    config = CircuitConfig(components={"q": {"22": [0, 8]}, "k": {"22": [2]}, "v": {"23": [0]},
                                       "mlp": {"25": [0, 1535]}}, projections="all")
    model = get_peft_model(base, config)
    size = circuit_size(config, model)
    assert size["components"] == 6 and size["total_components"] == 30 * (9 + 3 + 3 + 1536)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == size["trainable_params"]

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "circuit")
        save_as_lora(tmp_path / "lora", model, rank=1.0)

    # merged weights differ from the base exactly on the chosen slices
    arch = get_arch(base)
    merged = model.merge_and_unload()
    masks = {}
    for comp in config.component_list():
        for s in arch.component_slices(comp, None, merged):
            w = merged.get_submodule(s.module).weight
            masks.setdefault(s.module, torch.zeros_like(w, dtype=torch.bool))[:, :] |= torch.zeros_like(w, dtype=torch.bool)
            dim = 0 if s.axis == "out" else 1
            masks[s.module].narrow(dim, s.start, s.stop - s.start).fill_(True)
    for name, w in merged.state_dict().items():
        module = name.rsplit(".", 1)[0]
        diff = w != reference[name]
        if name.endswith(".weight") and module in masks:
            assert torch.equal(diff, masks[module]), name
        else:
            assert not diff.any(), name

    with torch.no_grad():
        assert (merged(input_ids=ids).logits - y).abs().max() < 1e-4
        loaded = PeftModel.from_pretrained(load_model("smollm2"), tmp_path / "circuit")
        assert (loaded(input_ids=ids).logits - y).abs().max() < 1e-5
        lora = PeftModel.from_pretrained(load_model("smollm2"), tmp_path / "lora")
        assert (lora(input_ids=ids).logits - y).abs().max() < 1e-3
