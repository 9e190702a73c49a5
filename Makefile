VENV ?= .venv
PY := $(VENV)/bin/python
# The environment is a file target: on a fresh clone `make run` and `make test` create it first (scripts/setup.sh
# installs the package last but one, so its console script marks a finished install; CI's own setup.sh call
# leaves nothing for make to redo). `make setup` re-runs the installer on demand (it is idempotent).
ENV := $(VENV)/bin/secateurs

.PHONY: setup run test lint bench results clean

$(ENV):
	VENV=$(VENV) bash scripts/setup.sh

setup:            ## (re)install everything into .venv (CPU torch first); run/test/lint do it when .venv is missing
	VENV=$(VENV) bash scripts/setup.sh

run: $(ENV)       ## the main job: FLAP 20 % on the default model (SmolLM2-135M-Instruct)
	$(VENV)/bin/secateurs run recipes/smollm2-flap-20.yaml --overwrite

test: $(ENV)      ## the test suite (tiny models + one real-model smoke test)
	$(PY) -m pytest -q

lint: $(ENV)
	$(VENV)/bin/ruff check compress quant cuda_ext search tests scripts
	$(VENV)/bin/mypy

bench: $(ENV)     ## CPU latency of the pruned model vs dense, quantization throughput
	$(PY) scripts/bench_latency.py
	$(PY) scripts/bench_quantize.py

results: $(ENV)   ## regenerate docs/results/pruning.md (about 15 min on 2 cores)
	$(PY) scripts/prune_results.py

clean:
	rm -rf out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
