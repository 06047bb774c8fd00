# One virtualenv, refreshed whenever pyproject.toml changes; every target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint serve soak gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,opencl]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m devrep.cli demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not soak" tests

bench: $(STAMP)
	$(PY) -m bench

# buf (proto lint) from npm, installed inside the virtualenv so the repository stays clean.
BUF := $(VENV)/node/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node @bufbuild/buf@1.75.0

lint: $(STAMP) $(BUF)
	$(VENV)/bin/ruff check devrep tests bench
	$(VENV)/bin/mypy devrep
	$(BUF) lint

serve: $(STAMP)
	$(PY) -m devrep.cli serve

soak: $(STAMP)
	$(PY) -m pytest -q -m soak --timeout 3600 tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/results.json
