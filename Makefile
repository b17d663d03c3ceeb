# Every target installs what it needs first (into .venv), so each works on a bare machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install test demo demo-tiny bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The test suite: 8 fake CPU devices are set in tests/conftest.py. Two workers, one test file
# each at a time (the CLI tests' processes leave a core idle): about 10 instead of 13 minutes on
# the 2-core machine. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The main job: SFT reference -> feedback log -> DRO-V / KTO / filtered SFT -> evaluation (CPU, minutes).
demo: $(STAMP)
	$(PY) -m dro_jax.demo --output=reports/demo

# The walking skeleton: a tiny DRO-V run on the bundled sample log.
demo-tiny: $(STAMP)
	$(PY) -m dro_jax.train --gin_file=gin_configs/runs/dro_tiny.gin --gin.MODEL_DIR="'runs/demo_tiny'"

# Train-step benchmark (tiny on CPU; on a GPU pass e.g. BENCH_ARGS="--sizes large --batch 32").
BENCH_ARGS ?= --sizes tiny --algos dro_v,kto,sft --precomputed_ref both
bench: $(STAMP)
	$(PY) -m dro_jax.bench $(BENCH_ARGS) --table

clean:
	rm -rf runs reports
