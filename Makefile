# Two entry points: `make demo` and `make test`. Both are idempotent and work as root
# on a fresh Debian 12 machine: they install what they need from Debian and PyPI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The interpreter the venv is built from: Debian's /usr/bin/python3 when it is >= 3.11 (a
# PGO+LTO build with libpython linked in, as is the python-build-standalone interpreter
# production runs; pyenv's default build has neither, and is slower: README, Development),
# else `python3` on PATH, resolved to the real executable (a pyenv shim adds ~80 ms to every
# exec). Too old or absent, it stops `make venv` with a message. `PYTHON=/path/to/python3
# make test` overrides it.
PY_MIN_OK := import sys; sys.exit(sys.version_info < (3, 11))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell if /usr/bin/python3 -c '$(PY_MIN_OK)' 2>/dev/null; then echo /usr/bin/python3; \
	else python3 -c 'import sys; print(sys.executable)' 2>/dev/null; fi)
endif
# $(PYTHON)'s resolved executable, stdlib directory and X.Y (empty if it does not run)
PY_INFO := $(if $(PYTHON),$(shell "$(PYTHON)" -c 'import os, sys, sysconfig; \
	print(os.path.realpath(sys.executable), sysconfig.get_path("stdlib"), \
	"%d.%d" % sys.version_info[:2])' 2>/dev/null))
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A venv's pyvenv.cfg records the resolved interpreter that made it (`executable`); a venv
# made by another interpreter (or with no pyvenv.cfg) is stale, and rebuilt from $(PYTHON).
VENV_BASE := $(shell sed -n 's/^executable = //p' $(VENV)/pyvenv.cfg 2>/dev/null)
VENV_STALE := $(and $(wildcard $(VENV)),$(filter-out x$(word 1,$(PY_INFO)),x$(VENV_BASE)))

# What the tests need from Debian, as check:package; a check is a command on PATH or an
# absolute path (for packages that ship no command of that name).
DEBIAN_TOOLS := ip:iproute2 setpriv:util-linux dig:bind9-dnsutils iptables:iptables \
	go:golang-go /usr/share/gocode/src/github.com/containernetworking/cni:golang-github-appc-cni-dev \
	/usr/lib/cni/ptp:containernetworking-plugins shellcheck:shellcheck \
	containerd:containerd runc:runc gcc:gcc /usr/include/signal.h:libc6-dev
# Debian ships ensurepip, which `python -m venv` needs, apart from its interpreter, in
# pythonX.Y-venv (what python3-venv depends on); the check is a file of that package.
ifneq ($(and $(filter /usr/bin/%,$(PYTHON)),$(PY_INFO)),)
DEBIAN_TOOLS += $(word 2,$(PY_INFO))/ensurepip/__init__.py:python$(word 3,$(PY_INFO))-venv
endif
# What the benchmarks add: the peers they measure against, and the load generator.
BENCH_TOOLS := dnsperf:dnsperf nsd:nsd dnsmasq:dnsmasq-base unbound:unbound dnsdist:dnsdist

.PHONY: help demo test lint typecheck unit deps bench-deps debian-install venv clean bench FORCE

help:
	@echo "make demo   - create .venv, install, run the lab demo (p5.48xlarge node)"
	@echo "make test   - create .venv, install, run lint, type checks and every test"

deps:
	@$(MAKE) --no-print-directory debian-install TOOLS="$(DEBIAN_TOOLS)"

bench-deps: deps
	@$(MAKE) --no-print-directory debian-install TOOLS="$(BENCH_TOOLS)"

debian-install:
	@missing=""; for pair in $(TOOLS); do \
	  check=$${pair%:*}; pkg=$${pair##*:}; \
	  case $$check in \
	    /*) test -e $$check || missing="$$missing $$pkg" ;; \
	    *) command -v $$check >/dev/null 2>&1 || missing="$$missing $$pkg" ;; \
	  esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "warning: missing Debian packages:$$missing (not root or no apt-get; netns tests will skip)"; \
	  fi; \
	fi

venv: $(STAMP)

# Two editable installs in one pip call: the products (with the test and chart extras) and the
# repo tools, a distribution of their own (tools/pyproject.toml) so that the product's wheel
# ships without them; it puts `ultranet-lab` on PATH and makes `tools` importable anywhere.
$(STAMP): pyproject.toml tools/pyproject.toml $(if $(VENV_STALE),FORCE) | deps
	@if [ -z "$(PYTHON)" ] || ! "$(PYTHON)" -c '$(PY_MIN_OK)' 2>/dev/null; then \
	  echo "error: $(VENV) needs Python >= 3.11:" \
	    "/usr/bin/python3 is $$(/usr/bin/python3 -V 2>/dev/null || echo absent)," \
	    "python3 on PATH is $$(python3 -V 2>/dev/null || echo absent)" \
	    $(if $(filter command line environment,$(origin PYTHON)),"and PYTHON=$(PYTHON) is $$("$(PYTHON)" -V 2>/dev/null || echo absent)") \
	    "(set PYTHON=/path/to/python3.11-or-later)" >&2; \
	  exit 1; \
	fi
	@if [ -n "$(VENV_STALE)" ]; then \
	  echo "$(VENV) was made by $(or $(VENV_BASE),an unknown interpreter), not $(word 1,$(PY_INFO)): rebuilding it"; \
	  rm -rf $(VENV); \
	fi
	@test -x $(VPY) || "$(PYTHON)" -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,chart]' -e ./tools
	@touch $(STAMP)

demo: deps venv
	$(VPY) -m tools.demo

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

typecheck: venv
	$(VPY) -m mypy

# pytest exits 5 when it collects nothing: a run that tested nothing must not pass.
unit: venv
	@$(VPY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: deps venv lint typecheck unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Long benchmarks, apart from `make test`; figures go in each package README.
bench: bench-deps venv
	$(VPY) -m tools.bench.ipam
	$(VPY) -m tools.bench.cni
	$(VPY) -m tools.bench.dns
	$(VPY) tools/bench/nau/run.py
