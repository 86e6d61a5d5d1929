# Quick start: `make run` then `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INPUT ?=
OUTPUT ?= out-webp
SAMPLES := samples

.PHONY: run test lint typecheck pytest samples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# With no INPUT, convert a small sample set that optimizr's own code draws.
run: $(STAMP)
ifeq ($(strip $(INPUT)),)
	$(BIN)/python -m optimizr.samples $(SAMPLES)
	$(BIN)/optimizr convert $(SAMPLES) $(OUTPUT)
else
	$(BIN)/optimizr convert "$(INPUT)" "$(OUTPUT)"
endif

samples: $(STAMP)
	$(BIN)/python -m optimizr.samples $(SAMPLES)

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(SAMPLES) $(OUTPUT) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
