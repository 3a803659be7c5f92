# boxrefine — `make help` lists the targets. The first target that needs Python creates .venv and
# installs the pinned dependencies (requirements.txt) plus this project in editable mode.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= pipeline.yaml
FAST    ?=
ARGS    ?=
SPLIT   ?= val
# refine's checkpoint: CKPT (a file or a run folder) when given, else boxrefine's own rule from CONFIG
# (refine.checkpoint, else best.pt of the latest run in train.runs_dir: what evaluate scores)
CKPT    ?=
STAMP   := $(VENV)/.installed

# gpu-check's Python: the venv's, or e.g. GPU_PYTHON=python3 where that Python already has the packages
GPU_PYTHON ?= $(BIN)/python

TRAIN_FLAGS := $(if $(filter 1 true yes,$(FAST)),--fast,)
QUICK   := $(filter 1 true yes,$(BENCH_QUICK))
BENCH_IMAGES  ?= $(if $(QUICK),4,16)
BENCH_VIT_B   ?= $(if $(QUICK),1,10)
BENCH_REPEATS ?= $(if $(QUICK),2,3)

.DEFAULT_GOAL := help
.PHONY: help venv demo-data extract train evaluate refine demo browser test test-fast mutate bench gpu-check lint clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: CONFIG=$(CONFIG) FAST=1 (train fast mode) ARGS='extra CLI flags'"
	@echo "             BENCH_QUICK=1 (make bench in small size: 4 images, vit_b on 1, 2 repeats, accuracy on 8, precision on 4)"
	@echo "             CKPT=runs/<name>/best.pt SPLIT=$(SPLIT) (refine; default: refine.checkpoint, else best.pt of the"
	@echo "             latest run in train.runs_dir of CONFIG, as evaluate)"
	@echo "             GPU_PYTHON=python3 (gpu-check with a Python that has the packages, instead of .venv)"
	@echo "             MODULES='geometry store' (make mutate: only these modules of bench/mutate/modules.toml)"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP) ## Create .venv with the pinned dependencies (automatic for every other target)

demo-data: $(STAMP) ## Generate the synthetic demo dataset where CONFIG's splits read it (data/demo)
	$(BIN)/boxrefine demo-data --config $(CONFIG) $(ARGS)

extract: $(STAMP) ## Encode images once into the feature store (boxrefine extract)
	@test "$(CONFIG)" != "pipeline.yaml" || test -f data/demo/annotations/instances_train.json || \
		$(BIN)/boxrefine demo-data --config $(CONFIG)
	$(BIN)/boxrefine extract --config $(CONFIG) $(ARGS)

train: $(STAMP) ## Train the refiner from the store (FAST=1 applies the fast: block)
	$(BIN)/boxrefine train --config $(CONFIG) $(TRAIN_FLAGS) $(ARGS)

evaluate: $(STAMP) ## Score checkpoints on the cached ground truth
	$(BIN)/boxrefine evaluate --config $(CONFIG) $(ARGS)

refine: $(STAMP) ## Refine the detections of a split with the latest (or CKPT) refiner (SPLIT; writes <detections>.refined.json)
	$(BIN)/boxrefine refine --config $(CONFIG) --split $(SPLIT) $(if $(CKPT),--checkpoint $(CKPT),) $(ARGS)

demo: $(STAMP) ## demo-data → extract → train (FAST) → evaluate → refine on the built-in demo data (where CONFIG reads it)
	$(BIN)/boxrefine demo-data --config $(CONFIG)
	$(BIN)/boxrefine extract --config $(CONFIG)
	$(BIN)/boxrefine store info --config $(CONFIG)
	$(BIN)/boxrefine train --config $(CONFIG) --fast
	$(BIN)/boxrefine evaluate --config $(CONFIG)
	$(BIN)/boxrefine refine --config $(CONFIG) --split val  # the run just trained: the latest in train.runs_dir

# the report's browser test drives a real headless Chromium: Debian's package, never a browser download
browser: ## Install Debian's chromium for the report's browser test when it is missing (needs root or sudo)
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

test: $(STAMP) browser ## Run the whole test suite (what CI runs; installs chromium when missing)
	BOXREFINE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP) ## Run the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

mutate: $(STAMP) ## Mutation testing of the critical modules (cosmic-ray; ~50 min, not in CI) → bench/out/mutate/report.md
	$(BIN)/python bench/mutate/mutate.py --out bench/out/mutate $(if $(MODULES),--only $(MODULES),) $(ARGS)

bench: $(STAMP) ## Benchmarks beside the peers → bench/out/report.md + PNG charts (BENCH_QUICK=1: the small size)
	$(BIN)/python bench/step_profile.py --images $(BENCH_IMAGES) --repeats $(BENCH_REPEATS) --json bench/out/step_profile.json
	$(BIN)/python bench/peers.py --images $(BENCH_IMAGES) --vit-b-images $(BENCH_VIT_B) --repeats $(BENCH_REPEATS) \
		--json bench/out/peers.json
	$(BIN)/python bench/accuracy.py $(if $(QUICK),--quick) --json bench/out/accuracy.json
	$(BIN)/python bench/precision.py $(if $(QUICK),--quick) --json bench/out/precision.json
	$(BIN)/python bench/eval_gt_cache.py --repeats $(if $(QUICK),1,3) --json bench/out/eval_gt_cache.json
	$(BIN)/python bench/eval_every.py $(if $(QUICK),--images 4 --val-images 2 --epochs 5) --json bench/out/eval_every.json
	$(BIN)/python bench/loader.py --images $(BENCH_IMAGES) $(if $(QUICK),--rows 8 --vit-b-rows 4 --repeats 2 --epoch-repeats 1) \
		--json bench/out/loader.json
	$(BIN)/python bench/report.py --out bench/out
	$(if $(QUICK),,$(BIN)/python bench/extract_overhead.py $(ARGS))
	$(if $(QUICK),,$(BIN)/python bench/refine_throughput.py)

gpu-check: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),$(STAMP)) ## On a CUDA machine: the GPU tests, then one table → bench/out/gpu_check.json
	$(GPU_PYTHON) bench/gpu_check.py --json bench/out/gpu_check.json $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

clean: ## Remove generated data, runs and caches (keeps .venv)
	rm -rf data runs bench/out .pytest_cache .ruff_cache
