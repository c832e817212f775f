# Two entry points: `make demo` and `make test`. Both are idempotent and work as root
# on a fresh Debian 12 machine: they install what they need from Debian and PyPI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The interpreter the venv is built from. A pyenv shim on PATH adds ~80 ms to every
# exec, so resolve it once to the real executable.
PYTHON ?= $(shell python3 -c 'import sys; print(sys.executable)' 2>/dev/null || echo /usr/bin/python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# What the tests need from Debian, as check:package; a check is a command on PATH or an
# absolute path (for packages that ship no command of that name).
DEBIAN_TOOLS := ip:iproute2 setpriv:util-linux dig:bind9-dnsutils iptables:iptables \
	go:golang-go /usr/share/gocode/src/github.com/containernetworking/cni:golang-github-appc-cni-dev \
	/usr/lib/cni/ptp:containernetworking-plugins
# What the benchmarks add: the peers they measure against, and the load generator.
BENCH_TOOLS := dnsperf:dnsperf nsd:nsd dnsmasq:dnsmasq-base unbound:unbound dnsdist:dnsdist

.PHONY: help demo test lint typecheck unit deps bench-deps debian-install venv clean bench

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
	@if ! "$(PYTHON)" -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  fi; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml | deps
	@test -x $(VPY) || "$(PYTHON)" -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: deps venv
	$(VPY) -m tools.demo

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

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
