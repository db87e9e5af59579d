# The two commands of the README: `make demo` and `make test`, each from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: demo test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall when the package definition changes; editable so that edits need no reinstall.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# A small real atlas of the bundled model: 3 layers x 8 channels + 8 class logits, each with
# a timelapse of its optimization and its dataset exemplars among 300 crops of scikit-image's
# sample photos (offline), and 16 concepts and a 6 x 6 activation atlas of blocks.8 learned
# from those crops (up to 52 more units, at 64 steps); a few minutes on a 2-core CPU. Rerunning it
# does only what is missing.
demo: $(VENV)/.installed $(DEMO_OUT)/photos
	$(BIN)/atlas run efficientnet_lite0 --layers blocks.3 --layers blocks.8 --layers blocks.13 \
		--channels 0-7 --classes hen,pelican,espresso,castle,goldfish,monarch,volcano,lemon \
		--steps 128 --timelapse 16 --exemplars $(DEMO_OUT)/photos --out $(DEMO_OUT) \
		--concepts 16 --activation-atlas 6 --concept-layers blocks.8 --concept-steps 64
	$(BIN)/atlas status $(DEMO_OUT)
	@echo "Open the atlas: $(DEMO_OUT)/site/index.html"

# The demo's exemplar folder, made once (a folder target: a rerun of `make demo` keeps it, so
# its exemplars stay stored); scikit-image comes with the test extra.
$(DEMO_OUT)/photos: bench/demo_photos.py | $(VENV)/.installed
	$(BIN)/python bench/demo_photos.py $@ --count 300 --seed 0

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

# The edit loop, under a minute: no real weights, torchvision builds, processes or browser.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# Issue 5's benchmark: atlas against Lucent and a naive loop, side by side, and a projection for
# the full Lite0 atlas; about 8 minutes on a 2-core CPU. Options: make bench BENCH_ARGS="--steps 128"
$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/speed.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
