# One command for the demo, one for the tests; each sets up its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without an NVIDIA GPU, pin torch to the CPU build (constraints/cpu.txt); with one, pip resolves the CUDA build.
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/harness run --recipe one-off

test: setup
	$(BIN)/ruff check harness recipes benchmarks tests perf scripts docker
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=12
	$(BIN)/harness leaderboard --check

bench: setup
	$(BIN)/python perf/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
