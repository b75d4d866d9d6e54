# One-command workflows on a fresh clone. Each target creates the virtual environment it
# needs ($(VENV)), installs PyTorch and the build/test tools into it, builds memengine
# against that torch, then runs.
#
#   make test    C++ tests (ctest) and the Python test suite
#   make bench   the kernel benchmarks (tables + CSVs in benchmarks/results/)
#
# Variables: VENV (default .venv), PYTHON (interpreter that creates it), TORCH_SPEC (what pip
# installs as torch; default the CUDA 13 build 2.14.1, e.g. TORCH_SPEC=torch==2.13.0 for a
# CPU-only build). Build knobs (MEMENGINE_SKIP_CUDA_BUILD, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# DEBUG, CUDA_HOME) pass through the environment; see the README.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
CMAKE_BUILD_DIR ?= cmake-build$(subst .venv,,$(VENV))

.PHONY: test bench build venv cpp-test py-test clean

venv: $(VENV)/.installed

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "setuptools>=64" wheel ninja cmake numpy pytest expecttest transformers==5.23.0
	touch $@

# --no-build-isolation: compile against the torch in $(VENV), never a second copy (README, "Installing").
build: venv
	$(PY) -m pip install --no-build-isolation --no-deps --editable . -v 2>&1 | tee $(VENV)/build.log | grep -E "memengine setup|rror" || true
	@grep -q "Successfully installed memengine" $(VENV)/build.log || (tail -40 $(VENV)/build.log; exit 1)
	$(PY) -m memengine info

cpp-test: build
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) > $(CMAKE_BUILD_DIR).log 2>&1 || (tail -40 $(CMAKE_BUILD_DIR).log; exit 1)
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build $(CMAKE_BUILD_DIR) >> $(CMAKE_BUILD_DIR).log 2>&1 || (tail -40 $(CMAKE_BUILD_DIR).log; exit 1)
	PATH="$(abspath $(VENV))/bin:$$PATH" ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

py-test: build
	$(PY) -m pytest -q -rs tests

test: cpp-test py-test

bench: build
	$(PY) benchmarks/bench_accumulate.py
	$(PY) benchmarks/bench_bias_grad_accumulate.py
	$(PY) benchmarks/bench_grad_stats.py
	$(PY) benchmarks/bench_wgrad_accumulate.py
	$(PY) benchmarks/bench_bf16_peak.py
	$(PY) benchmarks/bench_grad_accumulation.py
	$(PY) benchmarks/bench_plan.py

clean:
	rm -rf build cmake-build* memengine/_C*.so *.egg-info
