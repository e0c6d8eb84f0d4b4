# `make test` and `make demo` set up everything on a fresh machine: a .venv, the pinned packages, then the job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo web shapes scenes flow venv clean bench

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

# Text to pictures with the shipped Shapes-world checkpoints (pretrained/shapes/): sample.png and sample_*.png.
DEMO_TEXT ?= a large red circle in the top left
demo: $(STAMP)
	$(PY) demo.py --text "$(DEMO_TEXT)"

# The web demo on http://127.0.0.1:7860 (app.py; WEB_ARGS="--port 8080 --models DIR").
web: $(STAMP)
	$(PY) app.py $(WEB_ARGS)

# Reproduce pretrained/shapes/ from nothing (CLIP, VQGAN, pre-encoding, GPT, export, evaluation); see README.
shapes: $(STAMP)
	PY=$(PY) bash scripts/shapes.sh

# Reproduce pretrained/scenes/ from nothing (the several-object world); SUPERVISED=1 adds the --cond text GPT.
scenes: $(STAMP)
	PY=$(PY) bash scripts/scenes.sh

# The flow-matching prior beside a world's shipped GPT: pretrained/$(WORLD)/flow.safetensors (WORLD=shapes or scenes).
WORLD ?= shapes
flow: $(STAMP)
	PY=$(PY) WORLD=$(WORLD) bash scripts/flow.sh

# Benchmarks (bench/): results in bench/results/<machine>-<date>.json and .md. BENCH_ARGS="--only sampling --threads 2"
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
