# harkd — every target installs what it needs (system packages, a venv, the package).
SHELL := /bin/bash
# The distribution's Python is the reference (Debian 12 / Raspberry Pi OS: 3.11.2):
# a pyenv or a newer build in PATH must not decide what "works" means.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# System packages: ALSA headers (pyalsaaudio has no wheels), a broker for tests,
# PulseAudio null sink for paced audio, espeak-ng + sox for speech fixtures,
# openssl for the MQTT TLS tests' throwaway certificates.
APT_PACKAGES := libasound2-dev alsa-utils libasound2-plugins mosquitto pulseaudio \
	pulseaudio-utils espeak-ng sox openssl python3-venv python3-dev gcc
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench system venv clean

system:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/harkd demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon plugins tests benchmarks
	$(VENV)/bin/ruff format --check daemon plugins tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info

# A real systemd: debootstraps Debian 12 (cached in /var/cache/harkd-test, about a
# minute the first time), boots it with systemd-nspawn and follows the README's
# system-service steps inside. Needs root; -rP shows the measured times.
.PHONY: test-systemd
test-systemd: $(STAMP)
	$(MAKE) system APT_PACKAGES="systemd-container debootstrap"
	$(SUDO) env HARKD_TEST_SYSTEMD=1 $(PY) -m pytest -q -rP -m systemd_boot tests/test_systemd_boot.py

# A real Home Assistant (2026.2, which needs Python 3.13): debootstraps Debian 13 into
# /var/cache/harkd-test with Home Assistant in a venv (about 4 minutes and 1.6 GB the
# first time; each step is stamped, so an interrupted build resumes), then runs it with
# systemd-nspawn against a real harkd. Needs root; -rP shows the measured times.
.PHONY: test-ha
test-ha: $(STAMP)
	$(MAKE) system APT_PACKAGES="systemd-container debootstrap"
	$(SUDO) $(PY) tests/ha_tree.py
	$(SUDO) env HARKD_TEST_HA=1 $(PY) -m pytest -q -rP -m ha tests/test_ha.py

# The whole suite STRESS_RUNS times in a row while a CPU-bound process per core
# competes: a verdict that depends on the machine's speed shows up as a failure. One
# summary line per run; logs of failed runs are kept (their path is printed). The
# competitors are killed however the runs end; fails if any run failed.
STRESS_RUNS ?= 3
.PHONY: test-stress
test-stress: $(STAMP)
	@hogs=""; trap 'kill $$hogs 2>/dev/null' EXIT; \
	for i in $$(seq $$(nproc)); do $(PY) -c 'while True: pass' & hogs="$$hogs $$!"; done; \
	echo "test-stress: $(STRESS_RUNS) runs against $$(nproc) CPU-bound competitor(s) (pids$$hogs)"; \
	logs=$$(mktemp -d /tmp/harkd-stress.XXXXXX); failed=0; \
	for run in $$(seq $(STRESS_RUNS)); do \
		log=$$logs/run-$$run.log; \
		$(PY) -m pytest -q -p no:cacheprovider >$$log 2>&1; code=$$?; \
		echo "run $$run/$(STRESS_RUNS): exit $$code: $$(tail -n 1 $$log)"; \
		if [ $$code -ne 0 ]; then failed=1; grep -E '^(FAILED|ERROR) ' $$log; fi; \
	done; \
	if [ $$failed -ne 0 ]; then echo "test-stress: FAILED (logs in $$logs)"; exit 1; fi; \
	rm -rf $$logs; echo "test-stress: every run passed"
