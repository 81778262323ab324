# Set-up and entry points. `make test` and `make bench` each create .venv, install
# the build's requirements, then the project itself with its test and bench extras
# (pyproject.toml), build the extension and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# The build's requirements (pyproject.toml's [build-system], torch pinned). The project
# is installed without build isolation, so that the extension is compiled against this
# torch instead of a second copy fetched for the build alone.
BUILD_DEPS := torch==$(TORCH_VERSION) ninja setuptools wheel
# The pip options come from the machine's pip configuration (local wheels, caps).
MAX_JOBS ?= 2
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: test bench bench-finetune build gpu-check asan-check clean

# An editable install: `import incrkern` in .venv is this checkout. pip compiles the
# extension into place (incrkern/_C*.so, incrkern/_build_info.py).
$(VENV)/.installed: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(BUILD_DEPS)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --quiet --no-build-isolation -e '.[test,bench,finetune]'
	touch $@

# After a source change: ninja rebuilds only the translation units that changed.
incrkern/_build_info.py: $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py --quiet build_ext --inplace

# The install first, then a second make, which sees the files the install wrote: the
# build it just made is current.
build: $(VENV)/.installed
	@$(MAKE) --no-print-directory incrkern/_build_info.py

test: build
	$(PY) -m pytest -q tests

# The kernels, the sparse steps on real gradients and convergence, then training from
# scratch on a real corpus and sparse fine-tuning of a pretrained encoder (it comes
# with the bench extra), each at its quick size.
bench: build
	$(PY) -m incrkern.bench --quick
	$(PY) -m incrkern.bench corpus --quick
	$(PY) -m incrkern.bench finetune --quick

# The sparse fine-tuning benchmark alone.
bench-finetune: build
	$(PY) -m incrkern.bench finetune --quick

# For a machine with a GPU and no network: its own python3 and torch, no venv.
gpu-check:
	bash scripts/gpu_check.sh

# The CPU kernels' tests under AddressSanitizer, from a build of their own in a scratch
# folder (scripts/asan_check.sh); about 11 minutes on 2 cores.
asan-check: $(VENV)/.installed
	bash scripts/asan_check.sh

clean:
	rm -rf build incrkern/_C*.so incrkern/_build_info.py
