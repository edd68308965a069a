# Two commands set everything up on a fresh machine:
#   make demo   # venv + the whole workflow on the embedded sample data, then results/report.html
#   make test   # venv + the test suite
# CI (.ci/run) runs `make lint` (ruff, snakefmt, snakemake --lint), then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
RAW := data/raw

.PHONY: demo test lint format clean-results

# torch and torchvision are pinned together and installed first: PyPI's torchvision fails beside
# other torch builds (`operator torchvision::nms does not exist`), and lpips, torchmetrics'
# LPIPS and ultralytics need it.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	test -d $(RAW) || $(BIN)/facelora sample-data $(RAW)
	$(BIN)/snakemake --cores $(CORES) all
	$(BIN)/snakemake --report results/report.html
	$(BIN)/facelora summary

test: $(VENV)/.installed
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/snakemake --lint

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt Snakefile rules/

clean-results:
	rm -rf results logs .snakemake
