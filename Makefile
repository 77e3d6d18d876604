# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment in .venv first; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparkmpi demo

test: $(STAMP)
	sh scripts/install-browser.sh
	sh scripts/install-slurm.sh
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
