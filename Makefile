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

.PHONY: run test lint typecheck pytest bench deps test-deps peers-up peers-down clean

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

peers-up: test-deps
	bash tests/peers/up.sh

peers-down:
	bash tests/peers/down.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
