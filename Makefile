# The two Quick-start commands (README): `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test lint clean

setup:
	@scripts/setup_env.sh $(VENV)

# Main job: teach liver, spleen and kidneys from a few slices of a public CT, segment the rest, report
# DSC/NSD and write the .seg.nrrd and the model bundle, with LiteMedSAM's pretrained weights (offline:
# the same CT from ../shared; see scripts/demo.sh).
demo: setup
	VENV=$(VENV) SHARED=$(SHARED) scripts/demo.sh $(DEMO_ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
