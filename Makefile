# Two targets do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: API + dashboard, a SuperLink and 3 SuperNodes, the demo experiment with a
# progress bar; everything stays up (dashboard at http://127.0.0.1:8080) until Ctrl-C.
demo: $(STAMP)
	$(BIN)/florist up --clients 3

# Headless Chromium and Firefox ESR for the browser tests (Debian packages; never a browser
# download): Playwright drives Chromium, tests/firefox.py drives Firefox over WebDriver BiDi.
browser:
	@(command -v chromium && command -v firefox-esr) >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver firefox-esr)

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	tools/typecheck
	$(BIN)/lint-imports
	# Two workers each way (all of it run one test at a time took 30:39 on this machine; this,
	# 19:50). In-process tests spread test by test, one torch thread each. Real-process tests
	# spread file by file (--dist loadfile): a module's shared Flower stack starts once, on one
	# worker, and each stack has its own free ports and home.
	FLORIST_REQUIRE_POSTGRES=$${FLORIST_REQUIRE_POSTGRES:-0} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/pytest -q -n 2 -m "not e2e and not browser" --durations=10
	FLORIST_REQUIRE_POSTGRES=$${FLORIST_REQUIRE_POSTGRES:-0} \
		$(BIN)/pytest -q -n 2 --dist loadfile -m "e2e or browser" --durations=10

# The quick loop: no real Flower processes, no browser. Two workers on two cores: torch's own
# threads would make four (3:04 against 2:10 with one thread each, measured).
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -q -n 2 -m "not e2e and not browser and not slow"

# lint-imports keeps the layers of pyproject's [tool.importlinter]: a wrong-way import fails.
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && tools/typecheck && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) .florist artifacts .pytest_cache .mypy_cache .ruff_cache
