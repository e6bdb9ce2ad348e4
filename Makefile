# Two commands a new user needs: `make run` (the demo pipeline) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOME_DIR := $(abspath .slm)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export SLM_HOME ?= $(HOME_DIR)
export PREFECT_HOME ?= $(SLM_HOME)/prefect

.PHONY: install run test up down clean

# torch's CPU build first: `torch==2.13.0` is served from a local file on the project's
# machines; a bare `torch` requirement would pull a multi-GB CUDA build. `make run` installs what
# the pipeline needs; `make test` adds the test extras, which build llama-cpp-python from source
# (about 4 minutes on 2 cores) without its multimodal library (LLAVA_BUILD): the tests load text
# models only, and llama_cpp imports it only for image chat handlers.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $$CMAKE_ARGS" $(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/slm run --profile demo

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q

# A real local Prefect server (SQLite), a process worker and an MLflow server on 127.0.0.1.
up: install
	$(BIN)/python scripts/services.py up

down:
	$(BIN)/python scripts/services.py down

clean:
	rm -rf $(HOME_DIR)
