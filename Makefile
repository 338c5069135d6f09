# The two Quick-start commands (README): `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

setup:
	@scripts/setup_env.sh $(VENV)

# Main job. Until `automedsam demo` exists this is the best end-to-end run: read the shared real CT
# (DICOM series), bring its flipped label map onto the image grid through physical space and report
# geometry and per-label extents; then build a test-only backbone and encode/decode one slice.
demo: setup
	$(VENV)/bin/automedsam inspect $(SHARED)/data/ct_abdomen/ct_dicom \
	  --labels $(SHARED)/data/ct_abdomen/ct_dicom_labels.nii.gz --json
	$(VENV)/bin/automedsam backbones check tiny-sam2 --image $(SHARED)/data/ct_abdomen/ct_lowres.nii.gz --json

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
