# One-command workflows on a fresh clone. Each target creates the virtual environment it
# needs ($(VENV)), installs PyTorch and the build/test tools into it, builds memengine
# against that torch (again only when its C++/CUDA sources, setup.py or a build knob changed),
# then runs.
#
#   make test    C++ tests (ctest) and the Python test suite
#   make bench   the kernel benchmarks (tables + CSVs in benchmarks/results/)
#   make demo    memengine against plain PyTorch on this machine: a table, and results + plots in memengine-demo/
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

# Without a GPU the CUDA kernels are not built unless asked for (MEMENGINE_REQUIRE_CUDA=1, or
# MEMENGINE_SKIP_CUDA_BUILD=0): when nvcc happens to be installed, compiling them for two architectures took
# 169 s on an idle 2-core machine and 13 minutes on a shared one, for kernels that cannot run there.
HAVE_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo yes)
ifeq ($(HAVE_GPU)$(MEMENGINE_REQUIRE_CUDA)$(MEMENGINE_SKIP_CUDA_BUILD),)
export MEMENGINE_SKIP_CUDA_BUILD := 1
$(info make: no GPU here: building memengine's CPU kernels only (MEMENGINE_REQUIRE_CUDA=1 builds the CUDA ones too))
endif
# With one, the CUDA kernels are compiled for its architecture only, unless TORCH_CUDA_ARCH_LIST says otherwise
# (CI compiles for sm_80 and sm_90 explicitly).
ifeq ($(HAVE_GPU)$(TORCH_CUDA_ARCH_LIST),yes)
LOCAL_CUDA_ARCH := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
ifneq ($(LOCAL_CUDA_ARCH),)
export TORCH_CUDA_ARCH_LIST := $(LOCAL_CUDA_ARCH)
$(info make: building the CUDA kernels for this GPU's architecture, $(LOCAL_CUDA_ARCH) (TORCH_CUDA_ARCH_LIST overrides))
endif
endif

.PHONY: test bench demo build venv cpp-test py-test hf-latest-test clean FORCE

# `make` recompiles the extension only when something it is built from changed since the last build
# into $(VENV): a file of BUILD_INPUTS (newer than the stamp), a build knob, or memengine/_C*.so itself,
# which every venv's editable install writes to the same place in the tree (so after a build into another
# venv, e.g. VENV=.venv-cpu, this one rebuilds). The stamp records the knobs and the checksum of the
# extension of the last build into $(VENV). Python sources need no rebuild: the install is editable.
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc build_tools -type f ! -path '*/__pycache__/*' 2>/dev/null)
BUILD_KNOBS := MEMENGINE_SKIP_CUDA_BUILD=$(MEMENGINE_SKIP_CUDA_BUILD) MEMENGINE_REQUIRE_CUDA=$(MEMENGINE_REQUIRE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) DEBUG=$(DEBUG) CUDA_HOME=$(CUDA_HOME) CXX=$(CXX)
BUILD_STAMP := $(VENV)/.built
EXTENSION_CHECKSUM = cksum memengine/_C*.so 2>/dev/null
EXTENSION_NOW := $(shell $(EXTENSION_CHECKSUM))
BUILD_NOW := $(BUILD_KNOBS) $(EXTENSION_NOW)
BUILD_RECORDED := $(shell cat $(BUILD_STAMP) 2>/dev/null)
BUILD_STALE := $(if $(EXTENSION_NOW),,missing)$(filter-out $(BUILD_RECORDED),$(BUILD_NOW))$(filter-out $(BUILD_NOW),$(BUILD_RECORDED))

venv: $(VENV)/.installed

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "setuptools>=64" wheel ninja cmake numpy pytest expecttest transformers==5.23.0 accelerate==1.15.0 peft==0.22.0 matplotlib
	touch $@

build: $(BUILD_STAMP)
	$(PY) -m memengine info

# --no-build-isolation: compile against the torch in $(VENV), never a second copy (README, "Installing").
# The distribution is torch-memengine ("memengine" on PyPI is an unrelated project).
$(BUILD_STAMP): $(VENV)/.installed $(BUILD_INPUTS) $(if $(BUILD_STALE),FORCE)
	@echo "make: building memengine (full log: $(VENV)/build.log)"
	$(PY) -m pip install --no-build-isolation --no-deps --editable . -v 2>&1 | tee $(VENV)/build.log | \
		sed -unE -e '/memengine setup|rror/p' -e 's/^ *\[([0-9]+\/[0-9]+)\] .* -c [^ ]*(csrc\/[^ ]+\.(cpp|cu)).*/  [\1] compiling \2/p'
	@grep -q "Successfully installed torch-memengine" $(VENV)/build.log || (tail -40 $(VENV)/build.log; exit 1)
	@echo '$(BUILD_KNOBS)' "$$($(EXTENSION_CHECKSUM))" > $@

cpp-test: build
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) > $(CMAKE_BUILD_DIR).log 2>&1 || (tail -40 $(CMAKE_BUILD_DIR).log; exit 1)
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build $(CMAKE_BUILD_DIR) >> $(CMAKE_BUILD_DIR).log 2>&1 || (tail -40 $(CMAKE_BUILD_DIR).log; exit 1)
	PATH="$(abspath $(VENV))/bin:$$PATH" ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

py-test: build
	$(PY) -m pytest -q -rs tests

# The tests that use Hugging Face transformers, again against the newest 5.x release (the pinned
# 5.23.0 is what py-test uses): caches and layer signatures change between releases. The newer
# release goes into its own folder on PYTHONPATH, so the venv keeps the pinned one.
HF_LATEST := $(VENV)/transformers-latest
HF_TESTS := tests/segments/test_segment_llama.py tests/segments/test_segment_kv_cache.py \
	tests/engine/test_ergonomics.py tests/grad/test_grad_buffer.py tests/differential/test_against_pytorch.py \
	tests/integrations
hf-latest-test: build
	$(PY) -m pip install --quiet --upgrade --target $(HF_LATEST) "transformers>=5,<6"
	PYTHONPATH=$(abspath $(HF_LATEST)) $(PY) -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=$(abspath $(HF_LATEST)) $(PY) -m pytest -q -rs $(HF_TESTS)

test: cpp-test py-test hf-latest-test

bench: build
	$(PY) benchmarks/bench_accumulate.py
	$(PY) benchmarks/bench_bias_grad_accumulate.py
	$(PY) benchmarks/bench_grad_stats.py
	$(PY) benchmarks/bench_wgrad_accumulate.py
	$(PY) benchmarks/bench_bf16_peak.py
	$(PY) benchmarks/bench_grad_accumulation.py
	$(PY) benchmarks/bench_step_budget.py
	$(PY) benchmarks/bench_plan.py
	$(PY) benchmarks/bench_bytes_per_parameter.py
	$(PY) benchmarks/bench_data_parallel.py
	$(PY) benchmarks/bench_linear_cross_entropy.py

# The demo's extras (torch-memengine[demo]): plots and a progress bar; without them it still prints the table.
demo: build
	$(PY) -m pip install --quiet matplotlib tqdm
	$(PY) -m memengine demo

clean:
	rm -rf build cmake-build* memengine/_C*.so *.egg-info $(BUILD_STAMP)
