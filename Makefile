# One virtualenv, refreshed whenever pyproject.toml (or the C rearm loop, which the install compiles) changes; every
# target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test cpp-deps clang14 bench lint serve soak gpu-check clean

# Local wheels (e.g. torch's CPU build, /opt/wheels on our machines) are preferred when the directory exists:
# `torch==2.13.0` then resolves to 2.13.0+cpu from it (a local version outranks the index's CUDA build).
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)/*.whl),--find-links $(WHEELS))

$(STAMP): pyproject.toml devrep/linux/_wp.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(FIND_LINKS) -e '.[test,opencl]'
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

# tests/test_cpp_client.py builds a C++ client from protos/ with Debian's gRPC C++ (installed when missing;
# CI runs as root, elsewhere through sudo).
CPP_DEPS := libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc pkg-config g++
cpp-deps:
	@missing=""; for p in $(CPP_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$missing; fi

# Includes tests/test_wheel.py: builds the wheel, installs it into a fresh venv and runs it from outside the tree.
test: $(STAMP) clang14 cpp-deps
	$(PY) -m pytest -q -m "not soak" tests

bench: $(STAMP)
	$(PY) -m bench

# buf (proto lint) from npm, installed inside the virtualenv so the repository stays clean.
BUF := $(VENV)/node/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node @bufbuild/buf@1.75.0

lint: $(STAMP) $(BUF)
	$(VENV)/bin/ruff check devrep tests bench examples
	$(VENV)/bin/mypy devrep bench examples/cupy_reader.py
	MYPYPATH=tests $(VENV)/bin/mypy --explicit-package-bases tests
	for d in examples/embeddings_online examples/weights_hot_swap; do $(VENV)/bin/mypy $$d || exit 1; done
	$(BUF) lint

serve: $(STAMP)
	$(PY) -m devrep.cli serve

soak: $(STAMP)
	$(PY) -m pytest -q -m soak --timeout 3600 tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/results.json build
	rm -f devrep/linux/_wp.*.so  # the editable install builds the C rearm loop in place
