# The two commands of README.md: `make demo` and `make test`. Both create the environment when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines get the pinned CPU build of torch; GPU users override TORCH (see README: "GPU set-up").
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.medmtl-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so that no dependency drags in a multi-GB CUDA build on a CPU machine
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/medmtl demo configs/demo.yaml

test: setup
	$(PY) -m pytest -q

# quick mode (fewer rounds, no torch.compile, no served model): all benchmarks in under 15 minutes on 2 cores;
# BENCH=--full for each benchmark's own defaults (steadier medians, about an hour)
BENCH ?=
bench: setup
	$(PY) benchmarks/run_all.py $(BENCH)

clean:
	rm -rf demo_data runs mlflow/mlflow.db mlflow/mlflow.db.lock mlflow/artifacts
