# Subscale Pixel Networks pipeline. Every target installs what it needs first.
#   make demo | test | data | train-all | sample | evaluate | quality | upscale INPUT=x.png | deepen INPUT=x.png | bench
#   make compress INPUT=<folder|x.npz> OUT=x.spn | decompress INPUT=x.spn OUT=<folder|x.npz>
# Variables: EXP (conf/experiments/<EXP>.yaml, or a path to a YAML file), RUN_DIR, ARGS (LightningCLI
# overrides for training), N, TEMPERATURE, SEED, BATCH (sampling; evaluate's when given), IMAGES (evaluate
# those images), FID_N (images drawn for FID/KID, 0: evaluate draws none), INCEPTION (Inception-v3 weights
# file), INPUT, OUT (upscale, deepen, compress, decompress), QUICK, MINUTES (bench), PYTHON, TORCH.
SHELL := /bin/bash
.DELETE_ON_ERROR:
.SUFFIXES:

PYTHON ?= python3
# The CPU wheel lies on disk on the machines this project is built on; a machine with a GPU
# either has torch already (then nothing is installed) or asks for its build: make install TORCH=torch
TORCH ?= torch==2.13.0
EXP ?= fashion_mnist
override EXP := $(strip $(EXP))
# EXP names conf/experiments/<EXP>.yaml, or is the path of a YAML file: runs go to runs/<its stem>
EXP_FILE := $(if $(filter %.yaml %.yml,$(EXP)),$(EXP),conf/experiments/$(EXP).yaml)
RUN_DIR ?= runs/$(basename $(notdir $(EXP_FILE)))
override RUN_DIR := $(strip $(RUN_DIR))
# make splits a value with spaces into several words (files, targets): such an EXP or RUN_DIR stops here
space := $() $()
ifeq ($(EXP),)
$(error EXP is empty: name an experiment (EXP=fashion_mnist) or a YAML file)
endif
ifneq ($(words $(EXP)),1)
$(error EXP='$(EXP)' has spaces, and make cannot name files with spaces: rename the file without them, e.g. EXP=$(subst $(space),_,$(EXP)))
endif
ifeq ($(RUN_DIR),)
$(error RUN_DIR is empty: name the folder of the run, e.g. RUN_DIR=runs/my_run)
endif
ifneq ($(words $(RUN_DIR)),1)
$(error RUN_DIR='$(RUN_DIR)' has spaces, and make cannot name files with spaces: use a folder without them, e.g. RUN_DIR=$(subst $(space),_,$(RUN_DIR)))
endif
ARGS ?=
N ?= 16
TEMPERATURE ?= 1.0
SEED ?= 0
BATCH ?= 16
IMAGES ?=
FID_N ?= 500
INCEPTION ?=
INPUT ?=
OUT ?=
QUICK ?=
MINUTES ?=

CKPT := $(RUN_DIR)/checkpoints
PIPELINE := $(PYTHON) -m pipeline
RUN := --exp $(EXP) --run-dir $(RUN_DIR)
INSTALLED := .installed

# Targets that read an experiment stop at once, with one line, when it does not exist
NO_EXPERIMENT_GOALS := help install test test-fast
ifneq ($(filter-out $(NO_EXPERIMENT_GOALS),$(or $(MAKECMDGOALS),help)),)
ifeq ($(wildcard $(EXP_FILE)),)
$(error no experiment '$(EXP)': $(EXP_FILE) does not exist; use EXP=<one of $(basename $(notdir $(wildcard conf/experiments/*.yaml)))> or the path of a YAML file)
endif
endif

# The stages of this experiment's cascade (no size SPN when S = 1, no depth SPN when b = n; stages/plan.py). Before
# `make install` the command cannot run: then all three, and train-all asks again after installing.
STAGES := $(shell $(PIPELINE) stages --exp $(EXP) 2>/dev/null || echo first_slice size_spn depth_spn)
STAGE_CKPTS := $(foreach s,$(STAGES),$(CKPT)/$(s).ckpt)
# a stage's checkpoint is written whole (write, then rename): a Ctrl+C after it must not make make delete it
.PRECIOUS: $(STAGE_CKPTS)

.PHONY: help install test test-fast demo data train-all train-first train-size train-depth sample evaluate quality \
        upscale deepen compress decompress bench clean

help:
	@sed -n '2,7p' Makefile | sed 's/^# *//'
	@echo "Start with: make demo (install, data, train, sample, evaluate) or make test. README.md says more."

install: $(INSTALLED)
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -c "from stages import canonical, native; native.build(); canonical.build()"
	@touch $@

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

data: install
	$(PIPELINE) data $(RUN)

train-first: $(CKPT)/first_slice.ckpt
train-size: $(CKPT)/size_spn.ckpt
train-depth: $(CKPT)/depth_spn.ckpt
train-all: install
	@$(MAKE) --no-print-directory $(STAGE_CKPTS)

# Order-only prerequisites: the stages train in order, yet retraining one does not retrain the next.
# Each stage prepares the data first when it is missing (installing Fashion-MNIST if need be).
$(CKPT)/first_slice.ckpt: | $(INSTALLED)
	$(PIPELINE) train $(RUN) --stage first_slice $(ARGS)
$(CKPT)/size_spn.ckpt: | $(INSTALLED) $(CKPT)/first_slice.ckpt
	$(PIPELINE) train $(RUN) --stage size_spn $(ARGS)
$(CKPT)/depth_spn.ckpt: | $(INSTALLED) $(filter-out $(CKPT)/depth_spn.ckpt,$(STAGE_CKPTS))
	$(PIPELINE) train $(RUN) --stage depth_spn $(ARGS)

sample: train-all
	$(PIPELINE) sample $(RUN) --n $(N) --temperature $(TEMPERATURE) --seed $(SEED) --batch $(BATCH)

evaluate: train-all
	$(PIPELINE) evaluate $(RUN) $(if $(IMAGES),--images "$(IMAGES)") $(if $(filter command line environment,$(origin BATCH)),--batch $(BATCH))
	$(if $(filter-out 0,$(FID_N)),$(if $(IMAGES),,$(PIPELINE) quality $(RUN) --n $(FID_N) --seed $(SEED) $(if $(INCEPTION),--inception "$(INCEPTION)")))

# FID and KID of FID_N images drawn at TEMPERATURE against the test split (pipeline/inference/quality.py)
quality: train-all
	$(PIPELINE) quality $(RUN) --n $(FID_N) --temperature $(TEMPERATURE) --seed $(SEED) $(if $(INCEPTION),--inception "$(INCEPTION)")

# an experiment without a size SPN (S = 1) trains nothing: upscale says so at once
upscale: $(if $(filter size_spn,$(STAGES)),train-all,install)
	$(PIPELINE) upscale $(RUN) --input "$(INPUT)" --n $(N) --temperature $(TEMPERATURE) --seed $(SEED) --batch $(BATCH)

# an experiment without a depth stage trains nothing: deepen says so at once
deepen: $(if $(filter depth_spn,$(STAGES)),train-all,install)
	$(PIPELINE) deepen $(RUN) --input "$(INPUT)" --n $(N) --temperature $(TEMPERATURE) --seed $(SEED) --batch $(BATCH)

compress: train-all
	$(PIPELINE) compress $(RUN) --input "$(INPUT)" --out "$(OUT)"

decompress: train-all
	$(PIPELINE) decompress $(RUN) --input "$(INPUT)" --out "$(OUT)"

demo: install
	$(PIPELINE) data $(RUN)
	@$(MAKE) --no-print-directory train-all sample evaluate

# make bench: every benchmark side by side, into bench/results.json and bench/results.md
# (QUICK=1: a few minutes; MINUTES: training minutes per model in the quality comparison, default 15)
bench: install
	$(PYTHON) -m benchmarks.run --exp $(EXP) $(if $(QUICK),--quick) $(if $(MINUTES),--minutes $(MINUTES))

clean:
	rm -rf $(RUN_DIR)
