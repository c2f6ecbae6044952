# The two commands a newcomer needs: `make demo` and `make test`.
# Both create their own virtual environment on first use and install what they need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On machines without an NVIDIA GPU, install the CPU build of torch first; the project's own
# requirement (torch>=2.4) is then already satisfied and pip pulls no multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

.PHONY: test lint format demo venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PIP) install -q "$(CPU_TORCH)"
endif
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed lint
	$(PY) -m pytest -q

# Lint and format check (ruff; settings in pyproject.toml). `make format` rewrites the files.
lint: $(VENV)/.installed
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src tests bench scripts

format: $(VENV)/.installed
	$(PY) -m ruff format src tests bench scripts
	$(PY) -m ruff check --fix src tests bench scripts

demo: $(VENV)/.installed
	$(VENV)/bin/lorakit demo

clean:
	rm -rf $(VENV) .pytest_cache
