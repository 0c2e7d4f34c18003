# Two entry points do all the set-up: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Test processes (pytest-xdist): 2 fits the 2-core CI machine (9m53s against 16m55s for one).
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.covidcxr-installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml constraints.txt requirements-app.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# the [app] extra (Gradio) at its pins, without the resolver: gradio declares pillow<13, the pin is 13.0.0
	$(PY) -m pip install --quiet -c constraints.txt --no-deps -r requirements-app.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m covidcxr.train --arch resnet50

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

clean-venv:
	rm -rf $(VENV)
