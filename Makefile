# Shelfwise: `make demo` and `make test` do everything, from a fresh clone, on Python 3.11.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

# State lives under SHELFWISE_HOME; Dagster and BentoML need absolute homes inside it.
export SHELFWISE_HOME := $(abspath $(or $(SHELFWISE_HOME),data))
export DAGSTER_HOME := $(SHELFWISE_HOME)/dagster
export BENTOML_HOME := $(SHELFWISE_HOME)/bentoml
export BENTOML_DO_NOT_TRACK := true
export DO_NOT_TRACK := 1
export DBT_SEND_ANONYMOUS_USAGE_STATS := false
export OMP_WAIT_POLICY := PASSIVE
export PATH := $(BIN):$(PATH)

HOST ?= 127.0.0.1
SERVE_PORT ?= 3000
UI_PORT ?= 3001
DBT_MANIFEST := dbt_project/target/manifest.json
DBT_SOURCES := $(shell find dbt_project -path dbt_project/target -prune -o -type f \( -name '*.sql' -o -name '*.yml' \) -print)
INSTALLED := $(VENV)/.installed

.PHONY: help setup browser init demo pipeline data serve ui test docs lint format lock clean

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt pip setuptools wheel
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-build-isolation -e '.[dev]'
	@touch $@

$(DBT_MANIFEST): $(INSTALLED) $(DBT_SOURCES)
	$(BIN)/dagster-dbt project prepare-and-package --file orchestration/dbt_project.py

setup: $(INSTALLED) $(DBT_MANIFEST)  ## Create .venv from the pinned constraints and prepare the dbt manifest.

# The inspector page's browser test drives Debian's chromium through its chromedriver (never a
# browser download). Only `make test` needs them, so `make demo` works without; installed when
# missing, with apt-get as root, else through sudo.
BROWSER_PACKAGES := chromium chromium-driver
browser:  ## Install Debian's chromium and chromedriver for the browser test, when missing.
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	  if ! command -v apt-get >/dev/null; then \
	    echo "The browser test needs chromium and chromedriver at /usr/bin (Debian: $(BROWSER_PACKAGES))." >&2; \
	    exit 1; \
	  fi; \
	  as_root=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "Installing $(BROWSER_PACKAGES) (apt-get$${as_root:+ through sudo})"; \
	  $$as_root apt-get update -qq \
	    && $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null

init: setup
	@$(BIN)/shelfwise init

data: init  ## Generate the demo shop, unless the lake already holds events.
	$(BIN)/shelfwise generate --if-empty

# Run configuration from make variables, each only when given (the assets hold the defaults):
#   make pipeline MAX_INVALID_SHARE=0.3    ingest landing batches with up to 30% invalid rows
#   make pipeline LABEL_WINDOW_DAYS=28     evaluate and train on 28-day label windows
comma := ,
empty :=
space := $(empty) $(empty)
RUN_OPS := $(strip \
  $(if $(MAX_INVALID_SHARE),"raw_events":{"config":{"max_invalid_share":$(MAX_INVALID_SHARE)}}) \
  $(if $(LABEL_WINDOW_DAYS),"dbt_feature_tables":{"config":{"label_window_days":$(LABEL_WINDOW_DAYS)}}))
RUN_CONFIG := $(if $(RUN_OPS),--config-json '{"ops":{$(subst $(space),$(comma),$(RUN_OPS))}}')

# On a failure, the failed blocking checks (a held batch, a refused ranker) and what to do next are
# printed last, where the eye lands, instead of Dagster's stack trace.
pipeline: data  ## Materialize every asset (ingest → dbt → candidates → ranker → evaluation → bento).
	$(BIN)/dagster asset materialize -m orchestration.definitions --select '*' $(RUN_CONFIG) \
	  || { $(BIN)/python -m orchestration.failed_checks; exit 1; }

serve: init  ## Serve the latest bento on 127.0.0.1:3000.
	$(BIN)/bentoml serve shelfwise:latest --host $(HOST) --port $(SERVE_PORT)

ui: init  ## Open the Dagster UI on 127.0.0.1:3001.
	$(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(UI_PORT)

demo: pipeline  ## Set up, run the whole pipeline on generated data, then serve and open the UI.
	@$(BIN)/shelfwise demo-banner --host $(HOST) --serve-port $(SERVE_PORT) --ui-port $(UI_PORT)
	@# Dagster runs in the foreground and gets Ctrl-C itself; BentoML, a background job (which
	@# ignores SIGINT), is stopped with TERM when the recipe exits.
	@$(BIN)/bentoml serve shelfwise:latest --host $(HOST) --port $(SERVE_PORT) & serve=$$!; \
	  trap 'kill -TERM $$serve 2>/dev/null; wait $$serve' EXIT; \
	  $(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(UI_PORT)

test: setup browser  ## Run the test suite (installs the browser for the inspector's test).
	$(BIN)/pytest $(PYTEST_ARGS)

docs: setup  ## Build the docs site (strict).
	$(BIN)/mkdocs build --strict --site-dir site

lint: $(INSTALLED)  ## Check style with ruff.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)  ## Fix style with ruff.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock:  ## Re-resolve pyproject.toml into constraints.txt in a throw-away venv.
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ echo "# Every package of the resolved environment, pinned. Installs always use this file:"; \
	  echo "#   pip install -c constraints.txt -e '.[dev]'   (see the Makefile; regenerate with 'make lock')"; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | sort -f; } > constraints.txt
	.lock-venv/bin/python -m orchestration.serving_requirements
	rm -rf .lock-venv

clean:  ## Remove the virtual environment and the dbt build output (keeps data/).
	rm -rf $(VENV) dbt_project/target dbt_project/logs
