# pigeon: `make demo` runs the whole pipeline end to end; `make test` runs the test suite.
# Both create .venv and install everything themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench data clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch/torchvision first: pip takes the builds that lie on this machine's disk
	$(BIN)/python -m pip install --quiet "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest tests

# Rebuild the bundled run-time data (admin-1 polygons, cities, driving side) from ../shared/data.
data: venv
	$(BIN)/python scripts/make_bundled_data.py --shared $(SHARED)/data --out geocells/data

demo: venv
	bash scripts/demo.sh

bench: venv
	$(BIN)/python bench/build_cells.py

clean:
	rm -rf $(VENV) demo out .pytest_cache
