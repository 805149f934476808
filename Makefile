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
