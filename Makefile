# ReDistill Edge. `make distill` sets up and runs the main job; `make test` runs the tests.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA_ARCHIVE ?= ../shared/data/cifar10-jpeg.tar.gz
DATA    ?= data/cifar10
PRESET  ?= quick
TEACHER ?=
ARGS    ?=
RUN     ?= runs/$(PRESET)
CHECKPOINT ?= $(RUN)/student/best.pt
BUNDLES ?= bundles
JETSON  ?=
JETSON_PYTHON ?= python3

.PHONY: setup data distill evaluate memory export export-results deploy compare sample diffusion-bench test test-slow clean-venv

$(BIN)/redistill: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/redistill

data: $(DATA)/train

$(DATA)/train:
	@test -f $(DATA_ARCHIVE) || { echo "no data archive at $(DATA_ARCHIVE): set DATA_ARCHIVE=path/to/cifar10-jpeg.tar.gz or DATA=dir with train/ and test/"; exit 2; }
	mkdir -p $(DATA)
	tar -xzf $(DATA_ARCHIVE) -C $(DATA)

# Idempotent: an interrupted run resumes, a finished one only re-reports.
distill: setup data
	$(BIN)/redistill distill $(PRESET) data.root=$(DATA) $(if $(TEACHER),teacher.checkpoint=$(TEACHER)) $(ARGS) --resume

evaluate: setup data
	$(BIN)/redistill evaluate $(CHECKPOINT) --data-root $(DATA)

test: setup
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

clean-venv:
	rm -rf $(VENV)

# --- later stages (their CLIs live in bench/, export/, deploy/) ---
MEMORY_ARGS ?= --arch mobilenetv3_small-4-22111111111 --image-size 32
memory: setup
	$(BIN)/redistill memory $(MEMORY_ARGS)

# The FP32 vs INT8 report goes beside the bundles; results pages are rewritten only by `make export-results`.
export: setup data
	$(BIN)/redistill export $(CHECKPOINT) --out $(BUNDLES)/$(PRESET)-fp32 $(ARGS)
	$(BIN)/redistill export $(CHECKPOINT) --target orin-int8 --out $(BUNDLES)/$(PRESET)-int8 $(ARGS)
	$(BIN)/redistill export-report $(BUNDLES)/$(PRESET)-fp32 $(BUNDLES)/$(PRESET)-int8 --out $(BUNDLES)/$(PRESET)-export-report

# Rewrites the committed page bench/results/export_$(PRESET).{md,json} from the bundles `make export` wrote.
export-results: setup
	$(BIN)/redistill export-report $(BUNDLES)/$(PRESET)-fp32 $(BUNDLES)/$(PRESET)-int8 --out bench/results/export_$(PRESET)

deploy: setup
	@test -n "$(JETSON)" || { echo "set JETSON=user@host[:port] (or an ssh config alias; comma-separated for several)"; exit 2; }
	JETSON_PYTHON=$(JETSON_PYTHON) $(BIN)/redistill deploy $(BUNDLES)/$(PRESET)-fp32 --host $(JETSON) $(ARGS)

COMPARE_ARGS ?=
compare: setup
	$(BIN)/redistill compare $(COMPARE_ARGS)

# --- diffusion students (PRESET=ddpm_cifar10_x2 or ddpm_bench for the distill/export/deploy targets) ---
SAMPLE_ARGS ?= --n 64
sample: setup
	$(BIN)/redistill sample $(CHECKPOINT) $(SAMPLE_ARGS)

# The resumable 2.5 h CPU benchmark of issue 7 (teacher vs student alone vs student+RED); results in bench/results/diffusion.md
diffusion-bench: setup data
	$(BIN)/python -m bench.diffusion_bench --data-root $(DATA) --remarks bench/results/diffusion_remarks.md
