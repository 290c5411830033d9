# bkfac: the two commands a newcomer types are `make reproduce` and `make test`.
# Each creates .venv and installs the project into it when missing, and fetches CIFAR-10
# (`make data`) when it is not there.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bkfac-installed
PROFILE ?= cpu

# CIFAR-10: $BKFAC_DATA_DIR where it is set (as in CI: then nothing is fetched), else
# data/cifar10 of this checkout, downloaded there by `make data` (bkfac data fetch) when neither
# layout is found. Exported as an absolute path: the chapters run in chapters/ and .nbrun/.
ifeq ($(strip $(BKFAC_DATA_DIR)),)
export BKFAC_DATA_DIR := $(CURDIR)/data/cifar10
FETCH_DATA := 1
endif

# Quarto for `make reproduce`: where `quarto` is missing, the PyPI package (whose build downloads
# the Quarto binary) is installed into $(VENV), best-effort and within QUARTO_INSTALL_TIMEOUT s.
QUARTO_CLI             ?= quarto-cli>=1.6
QUARTO_INSTALL_TIMEOUT ?= 600
QUARTO_INSTALL         ?= $(PY) -m pip install -q "$(QUARTO_CLI)"
QUARTO_LOG             ?= $(VENV)/quarto-install.log
PREVIEW_DIR            ?= .preview

.PHONY: all venv data test test-fast reproduce book bench preview cuda-check clean help

help:
	@echo "make test       fetch CIFAR-10 if missing, run the whole test suite (unit tests + nbval over every"
	@echo "                chapter, smoke profile)"
	@echo "make reproduce  fetch CIFAR-10 if missing, regenerate every figure and table (profile: PROFILE=$(PROFILE)),"
	@echo "                then render the book (make book)"
	@echo "make data       download CIFAR-10 into data/cifar10 with torchvision unless it is there or BKFAC_DATA_DIR is set"
	@echo "make book       quarto render (installing quarto-cli when quarto is missing); where that fails, make preview"
	@echo "make bench      run the benchmark suite (bkfac bench all)"
	@echo "make preview    a readable stand-in for the book built with pandoc, .preview/index.html (no Quarto needed)"
	@echo "make cuda-check on a CUDA machine: CUDA tests, CPU-vs-CUDA correctness, step benchmark and one epoch"
	@echo "                per optimizer of the paper profile (synthetic data); CUDA_OUT=$(CUDA_OUT)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,book,bench]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
ifeq ($(FETCH_DATA),1)
	$(PY) -m bkfac data fetch --data-dir "$(BKFAC_DATA_DIR)"
else
	@echo "CIFAR-10: BKFAC_DATA_DIR=$(BKFAC_DATA_DIR) is set; nothing fetched"
endif

# One pytest run: the unit tests, and nbval executing every chapter (smoke-profile copies made
# by papermill, parameters injected) and comparing the cells tagged nbval-check-output.
test: data
	$(PY) -m bkfac.book prepare --profile smoke --out .nbrun/smoke
	$(PY) -m pytest -q --timeout=1500 --nbval-lax tests .nbrun/smoke

test-fast: $(STAMP)
	$(PY) -m pytest -q -x --timeout=600 tests -k "not nbval and not book_exec"

reproduce: data
	$(PY) -m bkfac reproduce --profile $(PROFILE)
	@$(MAKE) --no-print-directory book

# `quarto render`; where quarto is missing and cannot be installed (no access to its release
# downloads), or the render fails, one line says so and the pandoc preview stands in for the book.
# Exit status 0 unless quarto render itself failed.
book: $(STAMP)
	@export PATH="$(abspath $(VENV))/bin:$$PATH"; rc=0; status=0; \
	if ! command -v quarto >/dev/null 2>&1; then \
	  echo "Quarto is not on PATH: installing $(QUARTO_CLI) from PyPI into $(VENV) (it downloads the Quarto binary; at most $(QUARTO_INSTALL_TIMEOUT) s; log: $(QUARTO_LOG))"; \
	  tmo=$$(command -v timeout || command -v gtimeout || true); \
	  $${tmo:+$$tmo $(QUARTO_INSTALL_TIMEOUT)} $(QUARTO_INSTALL) >"$(QUARTO_LOG)" 2>&1 || rc=$$?; \
	fi; \
	if command -v quarto >/dev/null 2>&1; then \
	  if quarto render; then exit 0; fi; \
	  why="quarto render failed"; status=1; \
	elif [ "$$rc" = 124 ]; then \
	  why="Quarto is not installed: installing $(QUARTO_CLI) timed out after $(QUARTO_INSTALL_TIMEOUT) s"; \
	else \
	  why="Quarto is not installed: installing $(QUARTO_CLI) failed ($$(grep -m1 -o 'Error downloading Quarto: .*' "$(QUARTO_LOG)" || grep -m1 '^ERROR' "$(QUARTO_LOG)" || tail -n1 "$(QUARTO_LOG)"))"; \
	fi; \
	echo "The book was not rendered: $$why; the pandoc preview stands in for it ($(PREVIEW_DIR)/index.html)."; \
	$(PY) -m bkfac.book preview --out "$(PREVIEW_DIR)" >/dev/null || exit 1; exit $$status

bench: $(STAMP)
	$(VENV)/bin/bkfac bench all

# The book's pages -> .preview/*.html with pandoc (bkfac.preview): numbers, cross-references,
# citations and navigation as Quarto adds them; self-contained pages.
preview: $(STAMP)
	$(PY) -m bkfac.book preview --out "$(PREVIEW_DIR)"
	@echo "open $(PREVIEW_DIR)/index.html"

# The GPU check, one prepared script (no install: CUDA_PY may be any python with torch and this
# checkout on its path). CUDA_PROFILE/CUDA_DEVICE=smoke/cpu give a dry run on a CPU machine.
CUDA_PY      ?= $(PY)
CUDA_OUT     ?= data/results/bench/cuda
CUDA_PROFILE ?= paper
CUDA_DEVICE  ?= cuda
CUDA_TESTS   := tests/test_linalg_brand.py::test_brand_update_float32_cuda tests/test_seng.py::test_cuda_matches_cpu \
                tests/test_distributed.py::test_cuda_two_gloo_ranks_and_nccl \
                tests/test_models.py::test_channels_last_model_on_cuda_trains_like_nchw_on_cpu
cuda-check:
	mkdir -p $(CUDA_OUT)
	$(CUDA_PY) -m pytest -q -p no:cacheprovider --timeout=300 $(CUDA_TESTS) 2>&1 | tee $(CUDA_OUT)/tests.log
	-$(CUDA_PY) -m bkfac.bench.cuda_check --device $(CUDA_DEVICE) --steps 0 --out $(CUDA_OUT)
	$(CUDA_PY) -m bkfac bench step --profile $(CUDA_PROFILE) --device $(CUDA_DEVICE) --repeats 3 --max-seconds 30 \
	  --out $(CUDA_OUT)
	$(CUDA_PY) -m bkfac train --profile $(CUDA_PROFILE) --device $(CUDA_DEVICE) --optimizer all --epochs 1 \
	  --synthetic-data --quiet --out $(CUDA_OUT)/runs 2>&1 | tee $(CUDA_OUT)/epochs.log

clean:
	rm -rf .nbrun .preview _book .pytest_cache
