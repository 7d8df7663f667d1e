"""SIGKILL at random moments (seeded): a re-run after the kill gives what an uninterrupted run gives (scoring,
mining, amplify), and
a folder being rewritten holds one whole adapter, never a mix (docs/reliability.md)."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from circuit_peft.files import recover_dir

WORKER = Path(__file__).parent / "kill_worker.py"
pytestmark = pytest.mark.slow


def _kill_after(argv: list[str], seconds: float) -> int:
    """Run the worker, SIGKILL it after ``seconds`` (if still running); its return code."""
    proc = subprocess.Popen([sys.executable, str(WORKER), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _kill_when(argv: list[str], ready, timeout: float = 600) -> int:
    """Run the worker, SIGKILL it as soon as ``ready()`` holds (polled every 20 ms); its return code."""
    proc = subprocess.Popen([sys.executable, str(WORKER), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def _finish(argv: list[str]) -> float:
    """Run the worker to the end; its wall time in seconds (kill moments scale with this machine's speed)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(WORKER), *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return time.perf_counter() - start


def test_scoring_killed_at_random_moments_resumes_to_the_uninterrupted_scores(tmp_path):
    whole = _finish(["score", str(tmp_path / "clean"), str(tmp_path / "clean.npy")])  # (a fixed 4-12 s missed)
    rng = random.Random(12)
    killed = 0
    for _ in range(2):  # kill twice at random moments, each run resuming the last one's cache
        killed += _kill_after(["score", str(tmp_path / "cache"), str(tmp_path / "resumed.npy")],
                              rng.uniform(0.4, 0.8) * whole) == -signal.SIGKILL
    _finish(["score", str(tmp_path / "cache"), str(tmp_path / "resumed.npy")])
    assert killed >= 1  # at least one run died mid-way (else the test proved nothing)
    np.testing.assert_allclose(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "clean.npy"), rtol=1e-5)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


def test_mining_killed_at_random_moments_resumes_to_the_uninterrupted_records(tmp_path):
    from circuit_peft.cca.mining import PROGRESS_FILE, RECORDS_FILE

    whole = _finish(["mine", str(tmp_path / "clean")])
    rng = random.Random(5)
    killed, partial = 0, []
    progress = tmp_path / "resumed" / PROGRESS_FILE
    done = lambda: len(progress.read_text().splitlines()) if progress.exists() else 0  # noqa: E731
    # first at a random moment; then as soon as the resumed run has finished more problems (a loaded box can make
    # any fixed share of the clean run's time land before the first problem, so the second kill waits for one)
    killed += _kill_after(["mine", str(tmp_path / "resumed")], rng.uniform(0.4, 0.8) * whole) == -signal.SIGKILL
    partial.append(done())
    killed += _kill_when(["mine", str(tmp_path / "resumed")], lambda: done() > partial[0]) == -signal.SIGKILL
    partial.append(done())
    _finish(["mine", str(tmp_path / "resumed")])
    assert killed >= 1 and any(0 < n < 4 for n in partial), partial  # killed mid-way, after some problems
    for name in (RECORDS_FILE, PROGRESS_FILE):
        clean = (tmp_path / "clean" / name).read_text().splitlines()
        assert sorted((tmp_path / "resumed" / name).read_text().splitlines()) == sorted(clean), name


def _amplify_outputs(folder: Path) -> dict:
    """What an amplify run folder holds, less wall times and its own paths."""
    import json

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in ("timings", "files", "seconds")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    report = untimed(json.loads((folder / "report.json").read_text()))
    weights = load_file(folder / "adapter" / "adapter_model.safetensors")
    return {"report": report, "circuit": (folder / "circuit.json").read_text(),
            "records": sorted((folder / "mining" / "records.jsonl").read_text().splitlines()),
            "adapter": {k: v.tolist() for k, v in weights.items()}}


def test_amplify_killed_at_random_moments_resumes_to_the_uninterrupted_run(tmp_path):
    from circuit_peft.models import load_tokenizer, tiny_model

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=49152).save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    whole = _finish(["amplify", str(model_dir), str(tmp_path / "clean")])
    rng = random.Random(7)
    killed = sum(_kill_after(["amplify", str(model_dir), str(tmp_path / "resumed")],
                             rng.uniform(0.4, 0.9) * whole) == -signal.SIGKILL for _ in range(2))
    _finish(["amplify", str(model_dir), str(tmp_path / "resumed")])
    assert killed >= 1
    assert _amplify_outputs(tmp_path / "resumed") == _amplify_outputs(tmp_path / "clean")
    assert not [p for p in (tmp_path / "resumed").rglob("*") if ".tmp" in p.name or ".old" in p.name]


def test_an_adapter_folder_killed_while_rewritten_holds_one_whole_adapter(tmp_path):
    folder = tmp_path / "adapter"
    rng = random.Random(3)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(WORKER), "save", str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip()  # one save done; saves now follow each other
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        recover_dir(folder)  # what the next writer does first
        step = int((folder / "step.txt").read_text())
        weights = load_file(folder / "adapter_model.safetensors")
        values = {float(v) for t in weights.values() if t.dtype.is_floating_point for v in t.flatten().unique()}
        assert values == {float(step)}, f"weights of saves {sorted(values)} beside step.txt {step}"
        assert (folder / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"]  # temporaries of killed saves cleaned


def test_a_kill_between_the_two_renames_leaves_the_finished_new_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".adapter.old{dead}").mkdir()
    (tmp_path / f".adapter.old{dead}" / "step.txt").write_text("1")
    (tmp_path / f".adapter.tmp{dead}").mkdir()
    (tmp_path / f".adapter.tmp{dead}" / "step.txt").write_text("2")
    recover_dir(tmp_path / "adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (tmp_path / "adapter" / "step.txt").read_text() == "2"



def _load_outcome(path: Path, name: str, saved: dict) -> str:
    """``a`` or ``b`` when the adapter folder at ``path`` loads as that save's adapter ``name``; ``refused`` when
    loading raises a CircuitPeftError naming the folder; anything else fails the test."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from circuit_peft.errors import CircuitPeftError
    from circuit_peft.models import tiny_model

    try:
        model = PeftModel.from_pretrained(tiny_model("llama"), str(path), adapter_name=name)
    except CircuitPeftError as err:
        assert str(path) in str(err), err
        return "refused"
    loaded = get_peft_model_state_dict(model, adapter_name=name)
    same = [w for w, adapters in saved.items() if adapters[name].keys() == loaded.keys()
            and all(torch.equal(adapters[name][k], loaded[k]) for k in loaded)]
    assert same, f"{path} loaded as neither save: {sorted(loaded)}"
    return same[0]


def test_save_pretrained_killed_at_random_moments_loads_as_one_save_or_names_the_file(tmp_path):
    """Two models with two CIRCUIT adapters each, saved alternately into one folder by ``save_pretrained`` and
    SIGKILLed at random moments: every adapter loads as one save's (weights compared), or, in a new folder
    that no save finished yet, loading refuses naming the folder; an adapter that loaded before a kill
    loads after it."""
    from peft.utils import get_peft_model_state_dict

    from kill_worker import two_adapters

    saved = {w: {n: {k: v.clone() for k, v in get_peft_model_state_dict(m, adapter_name=n).items()}
                 for n in ("default", "extra")} for w, m in (("a", two_adapters("a")), ("b", two_adapters("b")))}
    trials = 20  # even trials start a new folder, odd ones save into the folder the trial before left
    proc = subprocess.Popen([sys.executable, str(WORKER), "alternate", str(tmp_path), "11", str(trials)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outcomes = []
    for trial, line in enumerate(proc.stdout):  # one killed save per line; the worker waits for our go
        folder = Path(line.strip())
        outcome = (_load_outcome(folder, "default", saved), _load_outcome(folder / "extra", "extra", saved))
        if trial % 2:  # an adapter the last kill left loadable must stay loadable
            assert all(now != "refused" for now, before in zip(outcome, outcomes[-1]) if before != "refused"), \
                (outcomes[-1], outcome)
        outcomes.append(outcome)
        proc.stdin.write("\n")
        proc.stdin.flush()
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    assert len(outcomes) == trials
    loaded = [o for pair in outcomes for o in pair if o != "refused"]
    assert {"a", "b"} <= set(loaded) and len(loaded) >= trials, outcomes  # kills landed across both saves


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action. A shell's background job (`make test &`, a CI step
    run in the background) starts with SIGINT ignored, the child inherits that, and Python then installs no
    KeyboardInterrupt handler: the SIGINT would be dropped and the command finish with 0 (docs/reliability.md)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_at(argv: list[str], start: str, sig: int, delay: float) -> tuple[int, str]:
    """Run the worker and send ``sig`` ``delay`` seconds after it prints a line starting with ``start`` (a
    stage that runs for longer than that); its return code and stderr."""
    import os
    import threading

    err_file = open(Path(argv[-1]).parent / f"{Path(argv[-1]).name}.stderr", "w+")
    proc = subprocess.Popen([sys.executable, str(WORKER), *argv], stdout=subprocess.PIPE, stderr=err_file, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_default_sigint)
    for line in proc.stdout:
        if line.startswith(start):
            threading.Timer(delay, proc.send_signal, (sig,)).start()
            break
    proc.stdout.read()
    proc.wait(timeout=600)
    err_file.seek(0)
    return proc.returncode, err_file.read()


def _train_outputs(folder: Path) -> dict:
    """What a train run folder holds, less wall times and its own paths: report, circuit, adapter."""
    import json

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in ("timings", "files", "seconds", "command")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    weights = load_file(folder / "adapter" / "adapter_model.safetensors")
    return {"report": untimed(json.loads((folder / "report.json").read_text())),
            "circuit": (folder / "circuit.json").read_text(),
            "adapter_config": (folder / "adapter" / "adapter_config.json").read_text(),
            "adapter": {k: v.tolist() for k, v in weights.items()}}


def test_train_killed_and_interrupted_in_each_stage_resumes_to_the_uninterrupted_run(tmp_path):
    """`circuit-peft train` with a control and a rate grid (tiny llama, SmolLM2's tokenizer): a SIGKILL while it
    locates, Ctrl-C (SIGINT) in the circuit's rate grid, a SIGKILL in the control's, each at a seeded random
    moment; the re-run's report (less wall times), circuit and adapter equal an uninterrupted run's. Ctrl-C
    exits 130 with one line saying how to resume, no traceback."""
    from circuit_peft.models import load_tokenizer, tiny_model

    model_dir = tmp_path / "model"
    tok = load_tokenizer("smollm2")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs: the same sums in the same order
    try:  # the uninterrupted run in this process: one interpreter start less
        from kill_worker import TRAIN_ARGS

        from circuit_peft.cli import main

        assert main(["train", "--model", str(model_dir), *TRAIN_ARGS, "--out", str(tmp_path / "clean")]) == 0
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(38)
    resumed = ["train", str(model_dir), str(tmp_path / "resumed")]
    stages = tmp_path / "resumed" / "stages"
    code, _ = _interrupt_at(resumed, "[rates]", signal.SIGKILL, rng.uniform(0, 0.5))  # in locate (or before)
    assert code == -signal.SIGKILL and not (stages / "train.json").exists()
    code, err = _interrupt_at(resumed, "[train] lr 0.001:", signal.SIGINT, rng.uniform(0, 0.3))  # at lr 0.03
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "circuit-peft train: interrupted. Finished stages and records are kept in the output folder; run the same "
        "command again to resume.")
    assert (stages / "train_lr0.001.json").exists() and not (stages / "train.json").exists()
    code, _ = _interrupt_at(resumed, "[control random_layer] training", signal.SIGKILL, rng.uniform(0, 1))
    assert code == -signal.SIGKILL and not (stages / "control_random_layer.json").exists()
    _finish(resumed)
    assert _train_outputs(tmp_path / "resumed") == _train_outputs(tmp_path / "clean")
    assert not [p for p in (tmp_path / "resumed").rglob("*") if ".tmp" in p.name or ".old" in p.name]
