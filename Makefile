# `make test` and `make demo` set up everything on a fresh machine: a .venv, the pinned packages, then the job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo web shapes scenes flow venv clean bench gpu-wheels

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# Two test processes (pytest-xdist; TEST_WORKERS=0 runs in this one): the tests are single-threaded.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "slow or not slow"

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

# Every GPU benchmark in one run (< 5 min on an H100-class GPU): on the GPU machine, `bash bench/gpu.sh`.
# Its Python lacks open_clip & co.: this downloads their wheels into .whl/ (carried there, installed by gpu.sh).
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
		open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 lpips==0.1.4

clean:
	rm -rf runs .pytest_cache
