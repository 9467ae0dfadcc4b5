# momoe: `make demo` and `make test` set up .venv (torch==2.13.0 + momoe) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.momoe-installed
KERNEL_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml
# Optional extra used by the reference-parity test: mamba-ssm's pure-PyTorch scan (no CUDA build).
MAMBA_ENV := MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE

.PHONY: install demo test pytest ctest cuda-check bench wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel ninja

$(STAMP): $(PY) $(KERNEL_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,test]'
	$(PY) -m pip install -q einops
	$(MAMBA_ENV) $(PY) -m pip install -q --no-build-isolation --no-deps mamba-ssm || \
		echo "note: mamba-ssm could not be installed; its parity test will be skipped"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib || \
		echo "note: matplotlib could not be installed; the demo skips its loss plot"
	$(VENV)/bin/momoe demo

test: ctest pytest

pytest: $(STAMP)
	$(PY) -m pytest -q tests

ctest: $(STAMP)
	$(VENV)/bin/cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build build-cmake -j2
	cd build-cmake && ../$(VENV)/bin/ctest --output-on-failure

# Compile check of the CUDA kernels (csrc/**/*.cu for sm_80 and sm_90a) and of their torch glue with
# nvcc, no GPU needed; then a check that the kernels define every symbol the glue needs.
NVCC ?= $(shell command -v nvcc)
CUTLASS_STAMP := $(VENV)/.cutlass-installed
# Only the wheel's headers are used: its Python side and dependencies are not needed.
$(CUTLASS_STAMP): $(PY)
	$(PY) -m pip install -q --no-deps 'nvidia-cutlass>=4.2'
	touch $@

cuda-check: $(STAMP) $(CUTLASS_STAMP)
	$(VENV)/bin/cmake -S . -B build/cuda-check -DCMAKE_BUILD_TYPE=Release -DMOMOE_CUDA=ON \
		-DMOMOE_PYTHON=$(abspath $(PY)) -DCMAKE_CUDA_COMPILER=$(NVCC)
	$(VENV)/bin/cmake --build build/cuda-check -j$(or $(MAX_JOBS),2) --target momoe_cuda_kernels momoe_cuda_glue
	cd build/cuda-check && ../../$(VENV)/bin/ctest -R cuda_glue_symbols --output-on-failure

# Steady state (glibc keeps freed memory) for every family, then gemm and permute again with glibc's
# default allocator (fresh page-faulted outputs); tables in .txt, numbers in .json.
bench: $(STAMP)
	$(PY) -m benchmarks.bench_ops --json benchmarks/results/bench_ops_cpu.json > benchmarks/results/bench_ops_cpu.txt && \
		cat benchmarks/results/bench_ops_cpu.txt
	$(PY) -m benchmarks.bench_ops --allocator system --only gemm,permute \
		--json benchmarks/results/bench_ops_cpu_system_allocator.json > benchmarks/results/bench_ops_cpu_system_allocator.txt && \
		cat benchmarks/results/bench_ops_cpu_system_allocator.txt
	$(PY) -m benchmarks.bench_mamba --json benchmarks/results/bench_mamba_cpu.json > benchmarks/results/bench_mamba_cpu.txt && \
		cat benchmarks/results/bench_mamba_cpu.txt
	$(PY) -m benchmarks.bench_models --batch 8 --json benchmarks/results/bench_models_cpu.json > benchmarks/results/bench_models_cpu.txt && \
		cat benchmarks/results/bench_models_cpu.txt
	$(PY) -m benchmarks.bench_distributed --json benchmarks/results/bench_distributed_cpu.json > benchmarks/results/bench_distributed_cpu.txt && \
		cat benchmarks/results/bench_distributed_cpu.txt

wheel: $(PY)
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build build-cmake dist *.egg-info momoe/_C*.so
