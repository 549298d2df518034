# Every target creates .venv itself on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint docs screenshots bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## run: serve on an embedded Redis and push 12 demo frames; see output/translated/
run: $(STAMP)
	$(BIN)/returner run --demo 12

## test: lint, type-check, then the whole suite against a real redis-server
## (tests/test_docs.py builds the docs strictly and checks the CLI reference)
test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check returner tests benchmarks docs
	$(BIN)/ruff format --check returner
	$(BIN)/mypy

## docs: the documentation site, built strictly into build/site/ (`$(BIN)/mkdocs serve` to browse)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## screenshots: the console's pages, taken again into docs/console/ for docs/console.md
screenshots: $(STAMP)
	RETURNER_SCREENSHOTS=docs/console $(BIN)/pytest tests/console/test_screenshots.py -p no:cacheprovider

## bench: the benchmark suite (figures in benchmarks/results.jsonl); see benchmarks/README.md
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/pytest benchmarks --benchmark-only -s -p no:cacheprovider

## fuzz: the property tests with 10,000 examples each
fuzz: $(STAMP)
	FUZZ_EXAMPLES=10000 $(BIN)/pytest -m fuzz -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .returner
