# `make test` and `make demo` set up everything on a fresh machine: a .venv, the pinned packages, then the job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo shapes venv clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# Until demo.py exists: a short VQGAN run on the Shapes world that writes a reconstruction grid.
demo: $(STAMP)
	$(PY) train_vqgan.py --preset shapes --batch-size 32 --max-steps 300 --val-every 300 --val-batches 4 \
		--out-dir runs/demo --no-tensorboard
	@echo "reconstruction grid (top: input, bottom: reconstruction): runs/demo/recon.png"

# Reproduce pretrained/shapes/ from nothing (CLIP, VQGAN, pre-encoding, GPT, export, evaluation); see README.
shapes: $(STAMP)
	PY=$(PY) bash scripts/shapes.sh

clean:
	rm -rf runs .pytest_cache
