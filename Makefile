VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint bench results clean

setup:            ## install everything into .venv (CPU torch first)
	bash scripts/setup.sh

run:              ## the main job: FLAP 20 % on the default model (SmolLM2-135M-Instruct)
	$(VENV)/bin/secateurs run recipes/smollm2-flap-20.yaml --overwrite

test:             ## the test suite (tiny models + one real-model smoke test)
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check compress quant cuda_ext search tests scripts
	$(VENV)/bin/mypy

bench:            ## CPU latency of the pruned model vs dense, quantization throughput
	$(PY) scripts/bench_latency.py
	$(PY) scripts/bench_quantize.py

results:          ## regenerate docs/results/pruning.md (about 15 min on 2 cores)
	$(PY) scripts/prune_results.py

clean:
	rm -rf out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
