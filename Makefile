# uad_study: the README's commands. `make demo` and `make test` set everything up on a fresh clone.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
STAMP := $(VENV)/.uad_study-installed
PYTHON ?= python3

.PHONY: help venv demo demo-seeds smoke test sync nbtest pytest bench qc docs docs-check clean-docs clean-runs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# The environment: re-installed when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)  ## create/update .venv with the package and its pinned dependencies

# The docs tools (the `docs` extra) get their own stamp, so `make test` never waits for them.
DOCS_STAMP := $(VENV)/.uad_study-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,docs]"
	@touch $(DOCS_STAMP)

# Repeatable CPU numbers across x86-64 machines: the same vector kernels (AVX2) in oneDNN, ATen and MKL whatever
# the processor offers (AVX-512 kernels give different floats); the demo profile also fixes torch to 2 threads.
REPRO := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2

demo: $(STAMP)  ## run the quickstart study on the embedded benchmark v2, preset demo (runs/demo; rerunning continues it)
	$(REPRO) $(BIN)/uad-study demo --out runs/demo --resume

demo-seeds: demo  ## the demo (seed 0, runs/demo) and seeds 1, 2 (runs/demo-seed*): the spread behind the README's table
	for s in 1 2; do $(REPRO) $(BIN)/uad-study demo --seed $$s --out runs/demo-seed$$s --resume --no-progress || exit 1; done
	$(PY) benchmarks/demo_spread.py runs/demo runs/demo-seed1 runs/demo-seed2

smoke: $(STAMP)  ## the quickstart at its tiny CI size (runs/smoke; rerunning continues it)
	$(BIN)/uad-study demo --profile smoke --out runs/smoke --resume

sync: $(STAMP)  ## notebooks and library in sync: nbdev-export must not change uad_study/
	$(BIN)/nbdev-export
	@git diff --exit-code --stat -- uad_study || { echo "uad_study/ differs from what the notebooks export: run nbdev-export and commit, never edit uad_study/ by hand"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- uad_study)" || { git status --short -- uad_study; echo "nbdev-export created files that are not committed"; exit 1; }

# The notebook tests run every library chapter as nbdev-test does (its skip flags, cwd nbs/) and keep the executed
# notebooks in docs/_build/executed/ for the site; the study chapters' papermill smoke runs (pytest) go there too.
EXECUTED := docs/_build/executed
nbtest: $(STAMP)  ## run the library notebooks' cells as tests (study chapters run under papermill in pytest)
	$(PY) -m uad_study.docsite execute --library --force --jobs 2

pytest: $(STAMP)  ## pytest: unit tests, bad inputs, determinism, and a papermill smoke run of every study chapter
	UAD_DOCS_EXECUTED=$(CURDIR)/$(EXECUTED) $(BIN)/pytest -q -m "not site"

test: sync nbtest pytest docs docs-check  ## every check: sync, notebook tests, pytest (incl. papermill smoke runs), the site built and checked in a browser

bench: $(STAMP)  ## speed/memory benchmarks with their references (results: benchmarks/README.md)
	$(PY) benchmarks/run_all.py

qc: $(STAMP)  ## QC montages of the embedded phantom under every preprocessing recipe (figures/qc/)
	$(PY) -c "from uad_study.study import phantom_qc_montages; print(*phantom_qc_montages(), sep='\\n')"

# MathJax 3 for the site's equations, from the npm registry at a pinned version and checksum (docs/fetch_mathjax.py
# says why it is fetched rather than committed); the tarball stays in $(VENV)/cache, so later builds are offline.
MATHJAX := docs/_static/mathjax/VERSION
$(MATHJAX): docs/fetch_mathjax.py
	$(PY) docs/fetch_mathjax.py --cache $(VENV)/cache

# -E: every page re-read, so a warning in any page fails every build (Sphinx >= 8.1 reports them all, then fails).
SPHINXOPTS ?=
# Chapters whose executed copy is missing or older than the code are executed first (after `make test`, none are);
# RUNS="runs/arch-cpu ...": those run folders' chapters are shown with their own outputs (resumed, not retrained).
RUNS ?=
docs: $(DOCS_STAMP) $(MATHJAX)  ## the documentation site in docs/_build/html (RUNS="run folders" to show cpu/paper runs; warnings are errors)
	$(PY) -m uad_study.docsite execute $(if $(strip $(RUNS)),--library --study --runs $(RUNS))
	UAD_DOCS_RUNS="$(RUNS)" $(BIN)/sphinx-build -b html -E -W -q -d docs/_build/doctrees $(SPHINXOPTS) docs docs/_build/html
	@echo "Site built: open file://$(CURDIR)/docs/_build/html/index.html (static files: publish by copying docs/_build/html/)"

# Without a chromium binary the browser checks skip with a message (a user's machine), except in CI (CI=true).
docs-check: $(DOCS_STAMP)  ## the built site in headless Chromium (Debian's chromium): links, equations, images, no network; screenshots
	UAD_REQUIRE_DOCS=1 UAD_REQUIRE_BROWSER=$(if $(filter true 1,$(CI)),1,0) $(BIN)/pytest -q -rs -m site tests/test_docs_site.py

clean-docs:  ## delete the built site, executed notebooks and generated pages (the MathJax tarball in $(VENV)/cache is kept)
	rm -rf docs/_build docs/api docs/generated docs/_static/mathjax

clean-runs:  ## delete runs/ (run folders); data caches in data/ are kept
	rm -rf runs
