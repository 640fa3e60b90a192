# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment in .venv when it is absent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; unpinned, pip picks a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_DIR ?= demo_output

.PHONY: venv demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m gazemonai.demo --out $(DEMO_DIR)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR)
