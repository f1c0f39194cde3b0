# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# torch first, with the exact pin that selects the local CPU wheel; everything else is
# constrained to it so that no package upgrades torch or pulls CUDA wheels.
TORCH   ?= torch==2.13.0
STAMP    = $(VENV)/.installed
# On a CUDA machine (nvidia-smi found) also the Triton JVP flash-attention kernel of sCM's tangent pass.
GPU_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo ,flash)

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[all$(GPU_EXTRA)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmkit train configs/ict_mnist_demo.yaml run.dir=runs/demo --force
	$(BIN)/cmkit eval runs/demo --steps 1 2 --n 1000
	$(BIN)/python -m cmkit.demo_summary runs/demo

# One pytest-xdist worker per core (TEST_WORKERS=0 runs in one process), each with one OpenMP thread unless the
# caller says otherwise: the suite's runs are small, and two threads against any other load oversubscribe the
# 2 cores (measured: the iCT toy test 18 s at 1 thread, 215 s at 2 under load; the suite 376 s in one process
# with 2 threads, 134 s on 2 workers x 1 thread, 2026-12-03).
TEST_WORKERS ?= auto
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf runs .pytest_cache
