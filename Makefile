# Each target installs what it needs into .venv first, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: install test demo bench readme clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned torch could pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[adaptive,dev]'
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collected no test: that is a failure, never a silent pass. Three workers
# (pytest-xdist; on two cores the third fills the others' waits); every test that uses Ray runs
# in one of them (tests/conftest.py), so one session cluster serves them
# (docs/decisions/0302-parallel-tests.md).
test: install
	@$(PY) -m pytest -q -p no:cacheprovider -n 3 --dist loadgroup; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status

# make-family reuses a family already trained with the same settings and code (demo/family/family.json).
demo: install
	$(VENV)/bin/haagenti examples make-family $(DEMO)/family
	$(PY) -m jobs.dedup --catalog $(DEMO)/family/catalog.yaml --library $(DEMO)/lib
	$(VENV)/bin/haagenti stats $(DEMO)/lib

bench: install
	$(PY) bench/storage.py
	$(PY) bench/similarity.py
	$(PY) bench/switching.py
	$(PY) bench/pipeline.py
	$(PY) bench/adaptive.py

# The README's "Using it" block, run as written in a fresh clone (minutes: it trains and evaluates).
readme: install
	$(PY) scripts/check_readme.py

clean:
	rm -rf $(DEMO) .pytest_cache
