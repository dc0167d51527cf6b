# vlmjobs: `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-test.lock pyproject.toml | cksum | cut -d' ' -f1)
VLMJOBS := $(BIN)/vlmjobs
RECIPE ?= recipes/tiny-demo.yaml

.PHONY: install demo test lock clean

install: $(STAMP)

# The exact versions in the lock files; the package itself is installed editable on top of them.
$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

# The main job on the embedded default: the local runner, a tiny model and synthetic data, on CPU.
demo: $(STAMP) .cache/tiny/llava/config.json .cache/data/chartqa/README.md .cache/data/rlaif-v/README.md
	$(VLMJOBS) run $(RECIPE)

.cache/tiny/%/config.json: | $(STAMP)
	$(VLMJOBS) tiny-model --family $* --out .cache/tiny/$*

.cache/data/%/README.md: | $(STAMP)
	$(VLMJOBS) synth-data --kind $* --out .cache/data/$*

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Re-resolve requirements*.lock after changing dependencies in pyproject.toml.
lock:
	scripts/lock.sh

clean:
	rm -rf runs .cache
