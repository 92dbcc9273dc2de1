# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
# Both run scripts/setup.sh first, which installs only what is missing.
PY      := .venv/bin/python
HPC     := .venv/bin/hpctrain
NP      ?= 4
ROOTOPT := $(if $(filter 0,$(shell id -u)),--allow-run-as-root,)
MPIRUN  := mpirun -q $(ROOTOPT) --oversubscribe --bind-to none -x OMP_NUM_THREADS=1
PYTEST  ?= -q

.PHONY: setup demo test bench gpu-check clean

setup:
	@bash scripts/setup.sh

demo: setup
	@start=$$(date +%s); \
	$(MPIRUN) -np $(NP) $(HPC) train --config configs/mnist1d.toml && \
	$(HPC) report runs/mnist1d/log.h5 --out runs/mnist1d/report && \
	echo "demo: $(NP) ranks trained in $$(( $$(date +%s) - start )) s" && \
	echo "demo: step log  runs/mnist1d/log.h5  (read it with analysis.load or h5py)" && \
	echo "demo: plots     runs/mnist1d/report/report.html"

test: setup
	$(PY) -m pytest $(PYTEST)

bench: setup
	$(PY) benchmarks/run_all.py --out benchmarks/out/RESULTS.md

# On a GPU node with its own Python (no setup: no network there); see docs/gpu-check.md.
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs .pytest_cache
