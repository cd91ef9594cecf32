# syntax=docker/dockerfile:1
# One image for both processes: `prefetcher operator` (the Deployment, non-root) and
# `prefetcher agent` (the DaemonSet the operator creates; it runs as root with a few
# capabilities, set by the chart). Build: docker build -t image-prefetcher:0.1.0 .
# Everything is installed at build time; nothing is downloaded when a container starts.
#
# BASE is any Debian-based image with python3 (3.11), its venv module, util-linux's mount
# and passwd's useradd: the official python image by default (python in /usr/local/bin), or
# e.g. a Debian bookworm with python3-venv (python in /usr/bin; the tests build on one).
# The steps use `python3 -m venv` and the venv's own python, never a path of the base.
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST point pip at a PyPI mirror, and
# PIP_CERT at a CA bundle the build can read (behind a TLS-inspecting proxy: e.g.
# `buildah bud --volume /etc/ssl/certs/ca-certificates.crt:/run/ca.crt:ro
# --build-arg PIP_CERT=/run/ca.crt`); the dependencies come from requirements.lock,
# checked against its hashes either way.

ARG BASE=python:3.11.11-slim-bookworm

# ---- build: the package and its locked dependencies into a virtual environment (wheels only)
FROM ${BASE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN python3 -m venv /opt/prefetcher \
    && /opt/prefetcher/bin/python -m pip install --no-cache-dir --require-hashes --no-deps \
       --only-binary :all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN /opt/prefetcher/bin/python -m pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && /opt/prefetcher/bin/python -m pip uninstall --yes setuptools wheel \
    && /opt/prefetcher/bin/python -m pip check \
    && /opt/prefetcher/bin/python -m pip uninstall --yes pip \
    && /opt/prefetcher/bin/prefetcher --help >/dev/null

# ---- runtime
FROM ${BASE}
ARG BASE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="image-prefetcher" \
      org.opencontainers.image.description="Pre-pulls container images onto Kubernetes nodes before pods need them (operator and node agent)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
ENV PATH=/opt/prefetcher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/prefetcher /opt/prefetcher
# The agent shells out to mount(8), umount(8) and cp(1) (util-linux and coreutils, both in
# the base image): check they are there. The non-root user runs the operator; the agent's
# pod sets runAsUser 0.
RUN command -v mount umount cp >/dev/null \
    && groupadd --system --gid 65532 prefetcher \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin prefetcher \
    && prefetcher --help >/dev/null
USER 65532:65532
ENTRYPOINT ["prefetcher"]
CMD ["--help"]
