# keeneye: `make demo` trains and evaluates on a generated dataset; `make test` runs the test suite.
# Both create .venv and install the package into it first (pip install -e .[dev]).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Optional: WEIGHTS=/path/to/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 for offline machines
WEIGHTS ?=

.PHONY: install demo test test-slow benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/keeneye demo $(if $(WEIGHTS),--set model.weights=$(abspath $(WEIGHTS)))

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# The long end-to-end checks kept out of `make test` so it stays under 8 minutes on 2 cores; CI runs both.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

benchmark: install
	$(BIN)/python benchmarks/train_casting.py

clean:
	rm -rf demo_run .pytest_cache benchmarks/results
