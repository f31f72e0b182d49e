# The two commands of README.md: `make run` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test lint typecheck pytest bench demo setup clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

# `make run` needs only Fender itself: no test tools, no Debian packages
$(RUN_STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) run
	touch $(RUN_STAMP)

setup: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/fender run --config config/fender.yaml

demo: $(RUN_STAMP)
	$(VENV)/bin/fender demo

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy policies config saga tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy proxy policies config saga

pytest: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
