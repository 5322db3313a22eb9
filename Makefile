# backup_assets: `make run` starts the demo and Dagster, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export BACKUP_ASSETS_DEMO_HOME ?= $(CURDIR)/.demo
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install run setup backup test bench clean stop env docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo,gcs,azure]'
	touch $(STAMP)

# Azurite, the Azure Blob Storage emulator the tests run (npm; skipped where there is no npm: those tests say so)
AZURITE := .tools/node_modules/.bin/azurite-blob
$(AZURITE):
	command -v npm >/dev/null && npm install --silent --no-audit --no-fund --prefix .tools azurite@3.35.0 || true

install: $(STAMP) $(AZURITE)

## set up the demo databases (reused when present) and start Dagster with its daemon on :3000
run: install
	$(PY) -m backup_assets.demo run

setup: install
	$(PY) -m backup_assets.demo setup

## back up yesterday's partition of every daily asset of the demo, from the command line
backup: install
	$(PY) -m backup_assets.demo backup

## stop everything `make run` started (Dagster webserver and daemon, the demo PostgreSQL)
stop: install
	$(PY) -m backup_assets.demo stop

## print shell settings for the command line: eval "$$(make -s env)"
env: install
	@$(PY) -m backup_assets.demo env

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.run

docs: install
	$(PY) -m mkdocs build --strict
	@echo "the manual: site/index.html"

clean:
	-$(PY) -m backup_assets.demo stop
	rm -rf .demo .dagster_home
