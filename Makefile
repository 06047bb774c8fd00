# One virtualenv, refreshed whenever pyproject.toml changes; every target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint serve soak gpu-check clean clang14

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,opencl]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m devrep.cli demo

# tests/test_kernels_build.py rebuilds the PoCL bitcode byte for byte with clang-14 (Debian packages clang-14,
# llvm-14); install them when missing (needs root and apt-get; elsewhere that one test skips, saying why).
clang14:
	@if command -v clang-14 >/dev/null && command -v llvm-link-14 >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang-14 llvm-14 \
		|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang-14 llvm-14; }; \
	else echo "clang-14 not installed and not root: the PoCL bitcode rebuild test will skip"; fi

# Includes tests/test_wheel.py: builds the wheel, installs it into a fresh venv and runs it from outside the tree.
test: $(STAMP) clang14
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
