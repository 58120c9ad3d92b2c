# prognode: `make demo` and `make test` each install everything first (idempotently).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OHIF_CHECK := ../shared/tools/ohif-check

.PHONY: setup system venv ohif test test-fast demo bench lint typecheck clean

setup: system venv ohif

system:
	bash scripts/install-system.sh

venv: $(STAMP)

# CPU torch first (the wheel on disk): otherwise monai pulls a multi-GB CUDA build.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The shared OHIF display check installs its own viewer and driver once per machine.
ohif:
	@if [ -x $(OHIF_CHECK)/setup.sh ]; then bash $(OHIF_CHECK)/setup.sh >/dev/null && echo "ohif-check: ready"; \
	else echo "ohif-check: $(OHIF_CHECK) not found, display tests will skip"; fi

test: setup
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# VIEW=1: keep Orthanc, the node and OHIF running (URLs printed) until Ctrl-C
demo: setup
	$(PY) scripts/demo.py --config config.toml $(if $(VIEW),--view)

bench: setup
	$(PY) bench/ingest.py
	$(PY) bench/time_to_result.py
	$(PY) bench/sweep.py

lint: venv
	$(VENV)/bin/ruff check node pipelines dicom_templates tests bench scripts
	$(VENV)/bin/lint-imports --no-cache  # layers and the torch-free receive path ([tool.importlinter] in pyproject.toml)

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache
