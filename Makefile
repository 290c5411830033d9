# bkfac: the two commands a newcomer types are `make reproduce` and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bkfac-installed
PROFILE ?= cpu

.PHONY: all venv test test-fast reproduce bench preview cuda-check clean help

help:
	@echo "make test       run the whole test suite (unit tests + nbval over every chapter, smoke profile)"
	@echo "make reproduce  regenerate every figure and table (profile: PROFILE=$(PROFILE)), then render the book"
	@echo "make bench      run the benchmark suite (bkfac bench all)"
	@echo "make preview    render the executed chapters to HTML with nbconvert (no Quarto needed)"
	@echo "make cuda-check on a CUDA machine: CUDA tests, CPU-vs-CUDA correctness, step benchmark and one epoch"
	@echo "                per optimizer of the paper profile (synthetic data); CUDA_OUT=$(CUDA_OUT)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,book,bench]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

# One pytest run: the unit tests, and nbval executing every chapter (smoke-profile copies made
# by papermill, parameters injected) and comparing the cells tagged nbval-check-output.
test: $(STAMP)
	$(PY) -m bkfac.book prepare --profile smoke --out .nbrun/smoke
	$(PY) -m pytest -q --timeout=1500 --nbval-lax tests .nbrun/smoke

test-fast: $(STAMP)
	$(PY) -m pytest -q -x --timeout=600 tests -k "not nbval and not book_exec"

reproduce: $(STAMP)
	$(VENV)/bin/bkfac reproduce --profile $(PROFILE)
	@if command -v quarto >/dev/null 2>&1; then \
	  quarto render; \
	else \
	  echo "Quarto is not on PATH: the book was not rendered. Install it (conda-forge 'quarto', see environment.yml," ; \
	  echo "or the official release) and run 'quarto render'; meanwhile 'make preview' renders the chapters to HTML."; \
	fi

bench: $(STAMP)
	$(VENV)/bin/bkfac bench all

# Executed chapters -> .preview/<chapter>.html with nbconvert (hidden / remove-input cells stay hidden).
preview: $(STAMP)
	$(PY) -m bkfac.book preview --out .preview
	@echo "open .preview/index.html"

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
	  --out $(CUDA_OUT) 2>&1 | tee $(CUDA_OUT)/step.log
	$(CUDA_PY) -m bkfac train --profile $(CUDA_PROFILE) --device $(CUDA_DEVICE) --optimizer all --epochs 1 \
	  --synthetic-data --quiet --out $(CUDA_OUT)/runs 2>&1 | tee $(CUDA_OUT)/epochs.log

clean:
	rm -rf .nbrun .preview _book .pytest_cache
