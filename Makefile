# The Quick start's two commands. Each creates or reuses the virtualenv .venv and installs what it needs.
#   make demo   train 2 facilities x 2 ranks on this machine (the main job)
#   make test   the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mpifed-installed

.PHONY: demo test install clean

install: $(STAMP)

# torch goes first and pinned: it is the CPU build from this machine's disk, so nothing below pulls a
# multi-GB CUDA build. Then mpifed with its dependencies, the embedded MPICH and the test tools.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/mpifed simulate --set model.preset=llama-small --rounds 5 --local-steps 20 --out run/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) run *.egg-info
