# Quick start: `make demo` and `make test`. Both create .venv on first use with a Python 3.12 or 3.13
# found by tools/find-python (PYTHON=... picks one), and reinstall only when pyproject.toml (the dependency
# spec) changes.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP := $(VENV)/.deps-$(SPEC)
OUT ?= reports/demo

.PHONY: demo test lint docs bench notebooks mutation venv clean

venv: $(STAMP)

$(STAMP):
	@set -euo pipefail; \
	if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(not (3, 12) <= sys.version_info[:2] < (3, 14))'; then \
		echo "$(VENV) has a Python outside 3.12-3.13; recreating it"; rm -rf $(VENV); fi; \
	if [ ! -x $(PY) ]; then py=$$(tools/find-python); echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); fi; \
	echo "installing dependencies into $(VENV) (first run: a few minutes; about 7 GB, most of it torch's CUDA libraries)"; \
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'; \
	rm -f $(VENV)/.deps-*; touch $@

demo: $(STAMP)
	$(PY) -m captum_chefer compare --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

# ruff (the rules, import order included) and mypy (the package's types), as pyproject.toml configures them;
# both run, and either failing fails the target.
lint: $(STAMP)
	@status=0; $(PY) -m ruff check . || status=1; $(PY) -m mypy || status=1; exit $$status

# The documentation site (mkdocs.yml) into site/, warnings as errors; open site/index.html. (The variable hides the
# theme's notice of its end of maintenance, which mkdocs.yml states.)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

bench: $(STAMP)
	$(PY) benchmarks/speed.py

# Execute notebooks at the small size the tests use and save them with their outputs:
# `make notebooks` runs all of them, `make notebooks NB="notebooks/02_side_by_side.ipynb"` the ones named.
# `$(PY) tools/run_notebooks.py --check` executes them and compares with the saved outputs (the rule the tests use).
notebooks: $(STAMP)
	$(PY) tools/run_notebooks.py $(NB)

# Mutation testing, one part of the package at a time (the parts are sections of setup.cfg: [mutmut] is `math`,
# [mutmut:<part>] the others): `make mutation PART=metrics` runs one part with its fast tests and writes
# benchmarks/MUTATION-<part>.md and the summary benchmarks/MUTATION.md; `make mutation` alone runs `math`
# (the math, the protocol and the capture layer: about 30 minutes on 2 cores), `PART=all` every part in turn (hours).
# `MUTATION_ARGS=--report-only` reports the last run again; `MUTATION_ARGS='--rerun-changed REV'` runs only the last
# report's survivors and the functions changed since REV, the commit its run mutated. Not part of `make test`.
MUTMUT_VERSION := 3.8.1
PART ?= math
mutation: $(STAMP)
	@$(PY) -c 'import importlib.metadata as m, sys; sys.exit(m.version("mutmut") != "$(MUTMUT_VERSION)")' 2>/dev/null \
		|| $(PY) -m pip install --quiet --disable-pip-version-check 'mutmut==$(MUTMUT_VERSION)'
	$(PY) tools/mutation_report.py --part $(PART) $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) reports .pytest_cache mutants site .mypy_cache .ruff_cache
