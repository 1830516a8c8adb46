# The testbed image: one `testbed` command for node pods and sweep jobs on a cluster
# (`testbed deploy kubernetes` writes manifests that use it; see README "On a cluster").
#
# Contains: Debian bookworm with Python 3.11 (python:3.11-slim-bookworm), the Debian packages a node
# and a runner use (tc, iptables, ping, iperf3, ...), a venv in /opt/venv with the package installed as
# `make setup` installs it (`pip install -e .`, torch pinned to its CPU wheel) and the gRPC stubs generated
# from protos/. Nothing is fetched at run time: models are built from seeds (or read from weights under
# /models, mounted), datasets are bundled. Runs as root: a node shapes its pod's interface with tc, which
# needs the NET_ADMIN capability (the manifests add it, and nothing else).
#
# Build and push:
#   docker build -t registry.example.com/testbed:0.1.0 .
#   docker push registry.example.com/testbed:0.1.0
# Build arguments: TORCH_INDEX (where the CPU torch wheel comes from; default PyTorch's CPU index; a
# local mirror works the same), TORCH_VERSION (must equal pyproject.toml's pin).
# Size: about 1.3 GB (torch's CPU wheel is most of it; no CUDA libraries, no compilers).
#
# Debian packages: the Makefile's DEB_PKGS minus those a node or runner in a container does not use
# (tests/test_dockerfile.py compares the two lists and reads these lines):
#   not installed: mininet - a pod is one device; Mininet builds namespaced hosts on one machine (run it with `make`)
#   not installed: libnetfilter-queue-dev - testbed/net/nfqueue.py speaks NFQUEUE over a raw netlink socket, no library
#   not installed: python3-venv - the base image's Python has venv built in
#   not installed: python3-dev - every dependency installs from a wheel: nothing is compiled
#   not installed: build-essential - the same: no compiler needed
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      iperf3 iptables iputils-ping ethtool iproute2 procps psmisc \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/testbed
# the pinned CPU torch first (its own layer: the largest, changed least), then the package
RUN python -m venv /opt/venv \
 && pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
COPY protos ./protos
COPY testbed ./testbed
COPY topologies ./topologies
COPY experiments ./experiments
RUN pip install -e . \
 && python -m testbed.protogen \
 && python -c "import torch, grpc, simpy, pandas, matplotlib, yaml, testbed.proto.node_pb2" \
 && mkdir -p /models /results

ENTRYPOINT ["testbed"]
CMD ["--help"]
