# The two commands: `make reproduce` (run the study) and `make test` (run the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= quick

.PHONY: reproduce test lab clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,cluster,xray]"
	$(PY) -m ipykernel install --sys-prefix --name saliency-study --display-name "saliency-study (.venv)" >/dev/null
	touch $@

reproduce: $(VENV)/.installed
	$(PY) -m study reproduce --profile $(PROFILE)

test: $(VENV)/.installed
	$(PY) -m pytest -q --nbval-lax --nbval-current-env

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf runs data/cache
