# The pipeline's DAG. Artifacts are file targets, so a target whose inputs have not changed does no
# work; every Python step also checks its own inputs and writes its outputs atomically.
#   make train EXP=baseline ARGS="lr=3e-4 epochs=20" FOLDS=0,2
#   make train NPROC=4          # data-parallel over 4 GPUs (torchrun; gloo on CPU)
COMPETITION ?= demo
EXP ?= baseline
ARGS ?=
FOLDS ?=
EXPS ?=
SUBMIT ?= 0
STACK ?= 0
NPROC ?= 1
TRIALS ?= 20

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
SHELL := /bin/bash

VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CLI_ARGS := competition=$(COMPETITION) $(ARGS) $(if $(FOLDS),folds=$(FOLDS))
# ARGS or FOLDS can change what a step computes: then the step always runs and decides itself.
FORCE_IF_ARGS := $(if $(strip $(ARGS)$(FOLDS)),FORCE)

DATA := data/$(COMPETITION)
COMP_YAML := configs/competitions/$(COMPETITION).yaml
FOLDS_CSV := folds/$(COMPETITION).csv
# Without EXPS, the ensemble blends every finished run of the competition (found by Python), and
# always asks Python, which knows when it is up to date; EXP's run is trained first if missing.
ENSEMBLE_DEPS := $(if $(strip $(EXPS)),$(foreach e,$(EXPS),runs/$(e)/scores.json),runs/$(EXP)/scores.json FORCE)
# NPROC>1 trains with torch's own launcher, one process per GPU (DistributedDataParallel).
TRAIN := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m,$(PY) -m) pipeline.train
# make submit (and bundle) EXP=x uses one experiment; without EXP, the ensemble.
SOURCE := $(if $(filter command line,$(origin EXP)),$(EXP),ensemble)

.PHONY: help install data init folds train tune ensemble submit bundle leaderboard bench test lint clean FORCE

help: ## list the targets (default)
	@echo "usage: make <target> [COMPETITION=$(COMPETITION)] [EXP=$(EXP)] [ARGS='key=value ...'] [FOLDS=0,2] [EXPS='a b'] [NPROC=1] [TRIALS=20]"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

install: $(INSTALLED) ## create .venv and install the project with its dev extras (idempotent)
$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

data: $(DATA) ## get the competition's files into data/<competition>/ (demo: built offline)
$(DATA): | $(INSTALLED)
	$(PY) -m pipeline.data $(CLI_ARGS)

init: $(DATA) ## draft configs/competitions/<competition>.yaml from the downloaded files
	$(PY) -m pipeline.init_competition $(CLI_ARGS)

folds: $(FOLDS_CSV) ## assign every training row to one CV fold
$(FOLDS_CSV): $(DATA) $(COMP_YAML) $(FORCE_IF_ARGS) | $(INSTALLED)
	$(PY) -m pipeline.folds $(CLI_ARGS)

train: runs/$(EXP)/scores.json ## train every fold of configs/<EXP>.yaml: OOF and test predictions, CV printed; NPROC=N: N GPUs
runs/%/scores.json: configs/%.yaml $(FOLDS_CSV) $(COMP_YAML) $(FORCE_IF_ARGS) | $(INSTALLED)
	$(TRAIN) --exp $* $(CLI_ARGS)

tune: $(FOLDS_CSV) $(COMP_YAML) | $(INSTALLED) ## Optuna search over configs/tune/<EXP>.yaml: TRIALS trials on fold 0 (or FOLDS), resumable
	$(PY) -m pipeline.tune --exp $(EXP) --trials $(TRIALS) -- $(CLI_ARGS)

ensemble: runs/ensemble/scores.json ## blend the OOF predictions of EXPS (default: every finished run); STACK=1 adds stacking
runs/ensemble/scores.json: $(ENSEMBLE_DEPS) $(FORCE_IF_ARGS) | $(INSTALLED)
	$(PY) -m pipeline.ensemble $(if $(strip $(EXPS)),--members $(EXPS)) $(if $(filter 1,$(STACK)),--stack) -- $(CLI_ARGS)

submit: runs/$(SOURCE)/scores.json ## write a validated submission; SUBMIT=1 uploads it
	$(PY) -m pipeline.submit --source $(SOURCE) $(if $(filter 1,$(SUBMIT)),--upload) -- $(CLI_ARGS)

bundle: runs/$(SOURCE)/scores.json ## offline folder for code competitions (models + predict.py), checked locally
	$(PY) -m pipeline.bundle --source $(SOURCE) -- $(CLI_ARGS)

leaderboard: | $(INSTALLED) ## one table of every run: CV, folds, time, leaderboard score
	$(PY) -m pipeline.leaderboard $(CLI_ARGS)

bench: | $(INSTALLED) ## measure training and inference speed against the compute limit
	$(PY) -m pipeline.bench $(ARGS)

test: | $(INSTALLED) ## the test suite CI runs (offline, CPU)
	$(PY) -m pytest -q

lint: | $(INSTALLED) ## ruff
	$(PY) -m ruff check pipeline tests

clean: ## remove runs/ and folds (keeps data/ and .venv/)
	rm -rf runs folds/*.csv folds/*.json
