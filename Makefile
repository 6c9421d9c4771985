# The two promised commands: `make demo` and `make test` (both create the venv as needed).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DATASET ?= digits
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
DATA_DIR ?=
PYTEST_ARGS ?= -n 2 --durations=20
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test lint format demo table1 clean

# What the package and `make demo` need (requirements.txt); `make test` adds the test tools
# of requirements-test.txt (pytest, ruff, PyTorch for the parity tests, JAX's CPU build).
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-jax.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(TEST_STAMP)

install: $(STAMP)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole pipeline on the embedded digits (no download); DATASET=cifar10 [DATA_DIR=...]
# runs it on other data. It replaces $(DEMO_DIR) from an earlier demo.
demo: $(STAMP)
	$(PY) -m apps.demo --dataset=$(DATASET) $(if $(DATA_DIR),--data_dir=$(DATA_DIR)) \
		--output_dir=$(DEMO_DIR) --overwrite $(DEMO_ARGS)

table1: $(STAMP)
	$(PY) -m apps.complexity --genotype=DARTS_V2,PIBCONV --layers=20,15,10,8,7,6,5,4,3,2 --init_channels=36

clean:
	rm -rf $(VENV) build *.egg-info
