# Two commands for users: `make run` and `make test`. Each sets itself up first.
# Set-up is idempotent: Debian packages only if missing, the venv only if stale.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Debian's python3 is used for the venv so that `--system-site-packages` sees Debian's mininet API.
SYS_PY := /usr/bin/python3
DEB_PKGS := mininet iperf3 iptables libnetfilter-queue-dev iputils-ping ethtool iproute2 procps psmisc \
            python3-venv python3-dev build-essential
EXPERIMENT ?= experiments/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: setup run test protos clean deb

setup: deb $(VENV)/.stamp protos

# Install missing Debian packages (root only; a non-root user gets told what is missing).
deb:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages (need root to install):$$missing; emulation tests will be skipped"; fi; \
	fi

$(VENV)/.stamp: pyproject.toml
	@test -x $(PY) || $(SYS_PY) -m venv --system-site-packages $(VENV)
	@echo "installing Python packages into $(VENV) (torch pinned to the local CPU wheel)"
	@extra=""; [ -d /opt/wheels ] && extra="--find-links /opt/wheels"; \
	set -o pipefail; $(PY) -m pip install -q $$extra -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(PY) -c "import torch, grpc, simpy, pandas, matplotlib, yaml" || { echo "set-up failed: Python packages missing"; exit 1; }
	@touch $@

# Python stubs are generated from protos/*.proto, never edited by hand (and not committed).
protos: $(VENV)/.stamp
	@$(PY) -m testbed.protogen

run: setup
	$(VENV)/bin/testbed run $(EXPERIMENT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	-$(VENV)/bin/testbed clean
	rm -rf $(VENV) build *.egg-info
