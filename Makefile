# One command for the demo, one for the tests; each sets up its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without an NVIDIA GPU, pin torch to the CPU build (constraints/cpu.txt); with one, pip resolves the CUDA build.
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)
# The one resolved stack (docker/lock.py): the venv installs exactly what the image installs and CI tested.
LOCK_FILES := docker/requirements.lock docker/torch.lock docker/dev.lock
LOCKS      := $(foreach lock,$(LOCK_FILES),-c $(lock))

.PHONY: setup demo test test-fast test-extended lint lock bench clean

$(BIN)/.installed: pyproject.toml constraints/cpu.txt $(LOCK_FILES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) $(LOCKS) -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/harness run --recipe one-off

test: setup
	$(BIN)/python docker/lock.py --check
	$(BIN)/ruff check harness recipes benchmarks tests perf scripts docker
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=12 -m "not extended"
	$(BIN)/harness leaderboard --check

# The variants `make test` leaves out to stay within CI's time (bf16 twins, all five throughput configurations).
test-extended: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m extended

# The edit loop (under 3 minutes on 2 cores): no real-model (slow), Docker, end-to-end (e2e) or extended tests.
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not docker and not extended and not e2e"

# Move the lock on purpose: resolve pyproject's ranges afresh in a throwaway venv, write the lock files
# from it, then `make test` rebuilds .venv from them and tests the new stack.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q $(TORCH_CONSTRAINT) -e ".[dev]"
	.lock-venv/bin/python docker/lock.py
	rm -rf .lock-venv

bench: setup
	$(BIN)/python perf/train_throughput.py

clean:
	rm -rf $(VENV) .lock-venv runs .pytest_cache
