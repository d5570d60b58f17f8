# cohort: `make run` starts the demo coordinator, `make test` runs the tests.
# Both set up .venv on first use (with the ray extra: the cluster tests run on a local Ray).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= examples/demo.toml
TORCH_VERSION ?= 2.13.0

.PHONY: setup run cluster test demo bench bench-quick gpu-check monitor soak clean

setup: $(VENV)/.installed

# torch is installed pinned and first: an unpinned `torch` from the index pulls
# a multi-GB CUDA build. A torch already importable by the venv is kept.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	@$(PY) -m pip install -q -e ".[test,ray]"
	@touch $@

run: setup
	$(PY) -m scheduler run --config $(CONFIG)

# One coordinator per GPU on Ray (a local Ray when none runs); COORDINATORS=2 on a machine without GPUs.
cluster: setup
	$(PY) -m scheduler cluster --config $(CONFIG) $(if $(COORDINATORS),--coordinators $(COORDINATORS))

demo: setup
	$(PY) examples/demo_client.py

# Two passes: the tests side by side, one pytest-xdist process per CPU (each test file on one of
# them), then those marked `alone` one at a time: they kill a coordinator and look at what its run
# left, which any other coordinator's start on the machine removes. TEST_JOBS=0: all in one process.
TEST_JOBS ?= logical
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests -m "not alone" -n $(TEST_JOBS) --maxprocesses 4 --dist loadfile
	$(PY) -m pytest -q tests -m alone

bench: setup
	$(PY) tools/bench.py --out docs/bench/latest.json

bench-quick: setup
	$(PY) tools/bench.py --quick --out /tmp/cohort-bench-quick.json

# Everything only a GPU can show (tests/gpu, the benchmark's quick set on cuda, NVML); on a
# machine without a GPU it says so and exits 0. Uses the Python that has torch (no venv needed).
gpu-check:
	@$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) tools/gpu_check.py

monitor: setup
	$(PY) tools/gpumon.py

soak: setup
	$(PY) tools/soak.py --minutes 5

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
