# bkfac: the two commands a newcomer types are `make reproduce` and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bkfac-installed
PROFILE ?= cpu

.PHONY: all venv test test-fast reproduce bench preview clean help

help:
	@echo "make test       run the whole test suite (unit tests + nbval over every chapter, smoke profile)"
	@echo "make reproduce  regenerate every figure and table (profile: PROFILE=$(PROFILE)), then render the book"
	@echo "make bench      run the benchmark suite (bkfac bench all)"
	@echo "make preview    render the executed chapters to HTML with nbconvert (no Quarto needed)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,book]'
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

clean:
	rm -rf .nbrun .preview _book .pytest_cache
