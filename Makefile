# The two quick-start commands: `make run` (set up and serve) and `make check` (format, lint, types, tests).
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run check test fmt bench screenshot system-deps

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) -m uvicorn main:app --host $(HOST) --port $(PORT) --no-access-log

check: $(VENV)/.installed system-deps
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy .
	$(PY) -m pytest

test: check

fmt: $(VENV)/.installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.installed
	$(PY) -m bench

# Chromium (browser tests) and a compiler (local model); installs when root, else says what to run.
system-deps:
	@scripts/system-deps.sh || echo "warning: some tests will be skipped without those packages"

# Rewrite docs/screenshot.png from a real browser session (the README shows it).
screenshot: $(VENV)/.installed
	UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/test_browser.py -k screenshot
