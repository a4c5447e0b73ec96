# Two commands do all the set-up: `make demo` and `make test` (both create .venv when missing).
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo study study-full traps test test-fast test-portable lint bench

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# The full comparison on the embedded default: LoRA, its own source stage, every weighting, two merge operators and
# learned weights, six targets, three data seeds, the transferability report (docs/study.md gives its time).
study: $(STAMP)
	OUTPUT=runs/study TRANSFERABILITY=true bash scripts/pipeline.sh

# The label-word traps (docs/estimators.md): four held-out targets whose label words are another family's, every
# similarity metric as a weighting, the committed source library; TRAP_BUDGET=200 tunes every arm 200 steps.
TRAP_BUDGET ?= 40
TRAP_FUSIONS := average Loss KL EL2N LogitsCos GraNd LEEP LogME Arrow GradAlign learned
traps: $(STAMP)
	OUTPUT=runs/traps-$(TRAP_BUDGET) TARGETS=TRAP_TASKS TARGET_BUDGETS=$(TRAP_BUDGET) FUSIONS="$(TRAP_FUSIONS)" \
		bash scripts/demo.sh

# All three delta methods, every bundled task as a target (hours on 2 CPU cores; minutes on a GPU).
study-full: $(STAMP)
	DELTAS="adapter lora prefix" TARGETS=ALL_TASKS OUTPUT=runs/study-full bash scripts/pipeline.sh

# One BLAS thread per process and one pytest worker per core (pytest-xdist): the test models are tiny, and two
# threads on two busy cores can be many times slower. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# Another machine's numerics on this one: PyTorch's baseline CPU kernels instead of the AVX2/AVX-512 ones it picks
# at start-up, so a test that holds only on this CPU's kernels fails here too (README, Tests). The cli tests (exit
# codes, help and messages of scripts in a fresh interpreter) compute nothing that depends on the kernels.
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m "not slow and not cli"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Benchmarks (bench/README.md), one BLAS thread (threads.py sets its own); each writes its table to bench/results/ (15 min on 2 CPU cores).
# bench/gpu.sh is not part of it: it needs a GPU machine.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/trainer_overhead.py
	OMP_NUM_THREADS=1 $(PY) bench/similarity.py
	OMP_NUM_THREADS=1 $(PY) bench/fusion.py
	OMP_NUM_THREADS=1 $(PY) bench/eval_speed.py
	OMP_NUM_THREADS=1 $(PY) bench/load_sources.py
	OMP_NUM_THREADS=1 $(PY) bench/grouped.py
	$(PY) bench/threads.py
	$(PY) bench/cli_startup.py
	$(PY) bench/library_scale.py
