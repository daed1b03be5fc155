# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates/updates the project virtual environment .venv with the pinned dependencies first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= outputs/demo

.PHONY: demo test lint clean-venv web test-web

demo: $(VENV)/.runtime-ok
	$(BIN)/medtranslate demo --out $(OUT)

test: $(VENV)/.dev-ok
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

web:  # the browser front end on http://127.0.0.1:8080/ (creates web/.venv first)
	web/run.sh serve

test-web:  # its tests, end to end in headless Chromium (apt-get install -y chromium chromium-driver)
	web/run.sh test

lint: $(VENV)/.dev-ok
	$(BIN)/ruff check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime-ok: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev-ok: requirements-dev.txt $(VENV)/.runtime-ok
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

clean-venv:
	rm -rf $(VENV)
