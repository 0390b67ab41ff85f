# The README's two commands: `make demo` (the main job on the built-in model) and `make test`.
# Both create .venv on first use, install torch and the other dependencies into it, and build
# marstore._C against that torch. Override TORCH to choose another build of torch, e.g.
#   make test TORCH='torch==2.11.0'
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu) setup.py pyproject.toml requirements-dev.txt

.PHONY: setup demo test bench cuda-check clean

setup: $(VENV)/.built

$(VENV)/.built: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

demo: setup
	$(BIN)/marstore doctor
	$(BIN)/marstore demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_transfer.py --quick
	$(BIN)/python benchmarks/bench_store.py --quick
	$(BIN)/python benchmarks/bench_extract.py --quick
	$(BIN)/python benchmarks/bench_read.py --quick
	$(BIN)/python benchmarks/bench_tokens.py --quick
	$(BIN)/python benchmarks/bench_similarity.py --quick
	$(BIN)/python benchmarks/bench_ragged_rewrite.py --quick
	$(BIN)/python benchmarks/bench_checkpoint.py --quick

# Compiles and links the CUDA sources against a CUDA build of torch on a machine without a
# GPU, then imports the result, so that a CUDA compile error cannot land unseen.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
NVCC_HOME = $(shell dirname $$(dirname $$(sed -n 's/^exec \(.*\)\/nvcc.*/\1\/nvcc/p' $$(command -v nvcc) 2>/dev/null || command -v nvcc)))
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" setuptools wheel pybind11 ninja numpy
	rm -rf build/cuda-check
	CUDA_HOME=$(NVCC_HOME) TORCH_CUDA_ARCH_LIST="8.0;9.0" MARSTORE_BUILD=cuda MAX_JOBS=2 \
	CPATH=$$($(CUDA_VENV)/bin/python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))') \
	$(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-check/lib --build-temp build/cuda-check/tmp
	$(CUDA_VENV)/bin/python .ci/import_cuda_build.py build/cuda-check/lib

clean:
	rm -rf build $(VENV) $(CUDA_VENV) marstore/*.so *.egg-info
