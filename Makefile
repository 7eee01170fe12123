# `make test` works on a fresh machine with only Python and pip: it creates .venv,
# installs the package with its test extras (once, or again when pyproject.toml changes)
# and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On x86_64 Linux the CPU wheels of torch 2.13 and PyPI's torchvision do not import together;
# these releases do, and pip finds them in the machine's local wheel store when it has one.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# A package index for the torch install only, e.g. PyTorch's CPU wheels (about 200 MB instead
# of the CUDA build's 6 GB): make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
# torch is a large download: pip shows its progress bar on a terminal and, in a log (CI),
# one line per file with --progress-bar=off, never minutes of silence.
PIP_PROGRESS := $(if $(CI),--progress-bar=off,)

# The demo-page test drives a real headless Chromium; as root on Debian it is installed here.
BROWSER ?= /usr/bin/chromium

.PHONY: test lint demo bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_PINS) into $(VENV)$(if $(TORCH_INDEX), from $(TORCH_INDEX),) (a large download: pip shows its progress)"
	$(PY) -m pip install $(PIP_PROGRESS) $(TORCH_PINS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	@echo "installing denseclip and its test extras into $(VENV)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(BROWSER):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "the demo-page test needs Chromium at $(BROWSER): install it (Debian: apt-get install chromium chromium-driver)" >&2; exit 1; \
	fi

test: $(VENV)/.installed $(BROWSER)
	$(PY) -m pytest -q

# The quickstart: synthetic ADE20K-layout data, a tiny DenseCLIP trained on CPU, its mIoU.
demo: $(VENV)/.installed
	$(VENV)/bin/denseclip quickstart

bench: $(VENV)/.installed
	$(PY) benchmarks/train_speed.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check denseclip tests benchmarks

clean-venv:
	rm -rf $(VENV)
