# The Quick start's two commands. Each creates or reuses the virtualenv .venv and installs what it needs.
#   make demo   train 2 facilities x 2 ranks on this machine (the main job)
#   make test   the whole test suite (what CI runs)
#   make test-quick  the tests a change most often breaks (tests/conftest.py QUICK), a few minutes
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mpifed-installed

.PHONY: demo test test-quick install clean

install: $(STAMP)

# torch goes first and pinned, so nothing below pulls another build. On a machine without a GPU it must be
# the CPU build: PyPI's Linux torch is the multi-GB CUDA one. So, where pip has no index or wheel folder of
# its own configured (as CI's has) and no GPU is seen, torch comes from PyTorch's CPU index; set
# TORCH_INDEX to choose another (empty: pip's own). Then mpifed with its dependencies, the embedded MPICH
# and the test tools. pip says what it collects as it goes.
TORCH_INDEX ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1 || \
	[ -n "$$PIP_INDEX_URL$$PIP_EXTRA_INDEX_URL$$PIP_FIND_LINKS" ] || \
	$(PYTHON) -m pip config list 2>/dev/null | grep -qE 'index-url|find-links'; \
	then echo; else echo https://download.pytorch.org/whl/cpu; fi)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "mpifed: installing torch 2.13.0 from $(or $(TORCH_INDEX),pip's configured index) (the largest download)"
	$(BIN)/python -m pip install --progress-bar on torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@echo "mpifed: installing mpifed and its dependencies"
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/mpifed simulate --set model.preset=llama-small --rounds 5 --local-steps 20 --out run/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m quick

clean:
	rm -rf $(VENV) run *.egg-info
