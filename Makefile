# Auth-Email: `make run` runs the product, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)

# Debian packages the test suite's peers need (Dovecot, Postfix, Chromium, curl, swaks, node,
# PostgreSQL; podman, runc and mmdebstrap build and run the container image; haproxy; msmtp, a scanner-like mail client). `make test`
# installs them when run as root, and otherwise prints the apt line.
TEST_DEBS := dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond dovecot-lmtpd postfix msmtp \
	chromium chromium-driver curl swaks openssl ca-certificates postgresql \
	podman runc mmdebstrap haproxy

.PHONY: run test lint typecheck pytest bench mutation mutation-table deps test-deps peers-up peers-down clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python requirements.txt requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

deps: $(STAMP)

## run: create the virtualenv, initialise instance/, start the web UI and the mail proxy
run: deps
	$(PY) serve.py

## test: install what the tests need, then lint, type-check and run every test
test: test-deps lint typecheck pytest

test-deps: deps
	@bash tests/install-deps.sh $(TEST_DEBS)

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: deps
	$(VENV)/bin/mypy

pytest: deps
	$(PY) -m pytest $(PYTEST_ARGS)

## bench: run the benchmarks against the local peers (not part of `make test`)
bench: test-deps
	$(PY) -m bench $(BENCH_ARGS)

## mutation: mutmut over the token lifecycle, mail backend, vault and proxy sessions/protocols,
## each mutant against the tests that reach it (slow: hours; not part of `make test`).
## MUTANTS narrows the run, e.g. MUTANTS='vault.*'; scores go into tests/MUTATION.md.
## With MODULE, MUTANTS names mutants of it to run (globs), keeping the others' results.
## MODULE runs one module against the test files listed for it in tests/mutation_run.py, e.g.
## `make mutation MODULE=oauth/tokens.py` (CHILDREN=1 by default); results in mutants/<module>.txt.
mutation: test-deps
	PEERS_KEEP=1 bash tests/peers/up.sh
ifdef MODULE
	PEERS_KEEP=1 $(PY) tests/mutation_run.py $(MODULE) $(or $(CHILDREN),1) $(MUTANTS)
	$(PY) -m tests.mutation_score mutants/$(subst /,.,$(MODULE)).txt tests/mutation_equivalent.txt
else
	PEERS_KEEP=1 $(VENV)/bin/mutmut run $(MUTANTS) || true
	$(VENV)/bin/mutmut results --all true > mutants/results.txt || $(VENV)/bin/mutmut results > mutants/results.txt
	$(PY) -m tests.mutation_score mutants/results.txt tests/mutation_equivalent.txt
endif

## mutation-table: re-run issue 18's table of one-line changes against the tests named for them
mutation-table: test-deps
	PEERS_KEEP=1 $(PY) -m tests.mutation_table $(CHANGES)

peers-up: test-deps
	bash tests/peers/up.sh

peers-down:
	bash tests/peers/down.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts mutants
