# Every target creates .venv on first use and installs the pinned set (requirements*.txt).
PYTHON ?= python3
PORT ?= 3000
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL ?= .demo/tiny-llava-video
CHROMIUM := /usr/bin/chromium
REDIS_SERVER := /usr/bin/redis-server

.PHONY: serve demo test lint build clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

## serve: the real model (LLAVA_MODEL, default lmms-lab/LLaVA-Video-7B-Qwen2) on the GPU, 4-bit
serve: $(STAMP)
	$(BIN)/bentoml serve service:LLaVAVideoService --port $(PORT)

## demo: a tiny random-weight checkpoint on CPU, same code paths (answers are gibberish).
## Other LLAVA_* settings pass through from the environment, e.g. LLAVA_URL_ALLOWLIST=127.0.0.1 make demo
demo: $(STAMP) $(DEMO_MODEL)/config.json
	LLAVA_MODEL=$(DEMO_MODEL) LLAVA_LOAD_4BIT=false LLAVA_DEVICE=cpu LLAVA_DTYPE=float32 \
	LLAVA_MAX_NEW_TOKENS=$${LLAVA_MAX_NEW_TOKENS:-32} \
	$(BIN)/bentoml serve service:LLaVAVideoService --port $(PORT)

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(BIN)/python -m testing.tiny --readable $(DEMO_MODEL)

## test: the whole test suite (tiny checkpoints, real media, real HTTP, the web page in chromium,
## jobs shared by two replicas through a real redis-server)
test: $(STAMP) $(CHROMIUM) $(REDIS_SERVER)
	$(BIN)/python -m pytest

# The web page's browser tests drive Debian's chromium with Playwright (which downloads no
# browser): installed here when missing and run as root; otherwise install it yourself, or run
# `$(BIN)/python -m pytest -m "not browser"` without those tests.
$(CHROMIUM):
	@if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium for the browser tests" >&2; \
	  apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
	  echo "$(CHROMIUM) is missing: sudo apt-get install chromium (or skip: $(BIN)/python -m pytest -m 'not browser')" >&2; \
	  exit 1; \
	fi

# The jobs' Redis tests start Debian's redis-server (7.0) on a free loopback port, saving
# nothing: installed here when missing and run as root, as chromium above.
$(REDIS_SERVER):
	@if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing redis-server for the jobs' Redis tests" >&2; \
	  apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	else \
	  echo "$(REDIS_SERVER) is missing: sudo apt-get install redis-server" >&2; \
	  exit 1; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## build: a Bento (then `bentoml containerize llava_video_service:latest`)
build: $(STAMP)
	$(BIN)/bentoml build
	@echo "note: the 'python=3.11' and 'system_packages' options are not ignored, whatever BentoML logged" \
	  "above: the generated Dockerfile installs them on the base image (bentofile.yaml, README: Container image)"

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
