# visalign: `make demo` and `make test` each build .venv from nothing when it is missing.
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip without its version-check notice; the editable installs without setuptools' "Editable
# installation" notice (informational only: nothing for a user to act on).
PIP_ENV := PIP_DISABLE_PIP_VERSION_CHECK=1
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"
PIP := $(PIP_ENV) $(PY) -m pip
STAMP := $(VENV)/.visalign-installed

.PHONY: demo test test-core test-slow lint format bench venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(QUIET_EDITABLE) $(PIP) install --quiet -e ".[dev,video]"
	@touch $(STAMP)

venv: $(STAMP)

# The HPSv2/open_clip tests need their own environment (see test-openclip below); they run first so
# that the last summary line is the main suite's.
test: test-openclip test-core

test-core: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# ruff: lint (pycodestyle, pyflakes, imports, bugbear, pyupgrade, Google docstrings) and the format check.
lint: $(STAMP)
	$(VENV)/bin/ruff check visalign tests benchmarks scripts notebooks/make_notebooks.py
	$(VENV)/bin/ruff format --check visalign tests benchmarks scripts notebooks/make_notebooks.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix visalign tests benchmarks scripts notebooks/make_notebooks.py
	$(VENV)/bin/ruff format visalign tests benchmarks scripts notebooks/make_notebooks.py

demo: $(STAMP)
	$(PY) -m visalign demo

bench: $(STAMP)
	$(PY) benchmarks/sampling.py --threads 1
	$(PY) benchmarks/grpo.py
	$(PY) benchmarks/rewards.py --threads 1

clean:
	rm -rf $(VENV) $(OPENCLIP_VENV) runs .pytest_cache

# HPSv2 / open_clip tests in their own environment: the registry's torchvision (pulled by
# open_clip_torch) is a CUDA build that breaks next to the CPU torch of .venv, so this venv takes
# the CUDA torch that matches it (about 5.5 GB; it runs fine on CPU).
OPENCLIP_VENV := .venv-openclip
OPENCLIP_PY := $(OPENCLIP_VENV)/bin/python
OPENCLIP_STAMP := $(OPENCLIP_VENV)/.visalign-installed

$(OPENCLIP_STAMP): pyproject.toml
	@test -x $(OPENCLIP_PY) || $(PYTHON) -m venv $(OPENCLIP_VENV)
	$(PIP_ENV) $(OPENCLIP_PY) -m pip install --quiet --upgrade pip
	$(PIP_ENV) $(OPENCLIP_PY) -m pip install --quiet "torchvision==0.29.1" open_clip_torch
	$(QUIET_EDITABLE) $(PIP_ENV) $(OPENCLIP_PY) -m pip install --quiet -e ".[dev]"
	@touch $(OPENCLIP_STAMP)

# test_openclip_remote.py serves HPSv2 from this venv and scores it from the main .venv's python.
.PHONY: test-openclip
test-openclip: $(OPENCLIP_STAMP) $(STAMP)
	$(OPENCLIP_PY) -m pytest -q tests/rewards/test_openclip.py tests/rewards/test_openclip_remote.py
