# flux-serve: `make serve` serves deploy/local.yaml; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000

# Ray on a shared machine: bind to 127.0.0.1, no usage stats, no token auth for the local CLI.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_DISABLE_TELEMETRY := 1

RUFF_VERSION := 0.17.5
RUFF_STAMP := $(VENV)/.ruff-$(RUFF_VERSION)
MYPY_VERSION := 2.4.1
MYPY_STAMP := $(VENV)/.mypy-$(MYPY_VERSION)

.PHONY: setup serve test test-fast lint bench clean

# The project's own modules, byte-compiled here (a no-op when up to date): every pytest worker, test process and
# Ray replica imports them, and where PYTHONDONTWRITEBYTECODE is set, each would compile them again.
setup: $(STAMP)
	@$(PY) -m compileall -q -j 0 serve_app bench tests >/dev/null

# Reinstalls only when the pins change. torch==2.13.0 is pinned so pip never pulls a CUDA build.
# pip byte-compiles what it installs on one core; compileall does it on every core (about 35 s less
# on 2). Like pip, it passes over the few files that do not compile (torch ships Python 3.12-only tests).
$(STAMP): requirements.lock pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-compile --no-deps -e .
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		>/dev/null 2>&1 || true
	touch $(STAMP)

# --address local: always a fresh single-machine Ray, never someone else's cluster.
# serve_app.ready prints one line once /health answers 200; it ends with `serve run` (Ctrl-C stops both).
serve: setup
	@$(PY) -m serve_app.ready deploy/local.yaml & ready=$$!; \
	$(VENV)/bin/serve run --address local deploy/local.yaml; status=$$?; \
	kill $$ready 2>/dev/null; exit $$status

# ruff and mypy, pinned and installed here (not with the app's pins). mypy reads the app's imports
# (pydantic, torch, ...) from the venv, so it needs `make setup` first; its settings are pyproject's [tool.mypy].
lint: setup $(RUFF_STAMP) $(MYPY_STAMP)
	$(VENV)/bin/ruff check serve_app tests bench
	@# The project speaks of itself alone: its code and docs point to its own docs/, never outside the repository.
	@! grep -rnIE '\.\./shared|\bSPEC\b|notes/[a-z-]+\.md' serve_app tests bench docs deploy README.md \
		|| { echo "lint: the lines above point outside the repository; point to docs/ instead" >&2; exit 1; }
	$(VENV)/bin/mypy

$(RUFF_STAMP):
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check ruff==$(RUFF_VERSION)
	touch $(RUFF_STAMP)

$(MYPY_STAMP):
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check mypy==$(MYPY_VERSION)
	touch $(MYPY_STAMP)

# Two pytest runs. First everything but the cluster on two pytest-xdist workers: the tests that share the
# session's local Ray Serve (tests/serve, tests/browser) stay together on one worker (`--dist loadgroup`, their
# group in tests/conftest.py), while the other takes the tests that start no Ray, in the time that Serve's tests
# spend waiting. Then the cluster tests alone: they time what a lost node costs, so nothing else runs beside them.
# With PYTEST_ARGS, one run of those. pytest's exit 5 (no test collected) is a failure. --durations=15: the
# slowest tests, every run.
PYTEST_RUN = $(PY) -m pytest --durations=15 $(1); rc=$$?; [ $$rc -ne 5 ] || { echo "no tests ran" >&2; exit 1; }; \
	[ $$rc -eq 0 ] || exit $$rc
test: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	$(call PYTEST_RUN,tests --ignore=tests/cluster -n 2 --dist loadgroup)
	$(call PYTEST_RUN,tests/cluster)
else
	$(call PYTEST_RUN,$(PYTEST_ARGS))
endif

# The inner loop: the tests that start no Ray, no browser and no server process of their own, on two workers.
test-fast: setup
	$(PY) -m pytest tests/unit -m "not slow" -n 2 --durations=10 $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.compare

clean:
	rm -rf $(VENV) .flux-serve .pytest_cache
