# syntax=docker/dockerfile:1
# One image for both processes: `prefetcher operator` (the Deployment, non-root) and
# `prefetcher agent` (the DaemonSet the operator creates; it runs as root with a few
# capabilities, set by the chart). Build: docker build -t image-prefetcher:0.1.0 .
# Everything is installed at build time; nothing is downloaded when a container starts.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build: the package and its dependencies into a virtual environment (wheels only)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN python -m venv /opt/prefetcher \
    && /opt/prefetcher/bin/pip install --no-cache-dir /src \
    && /opt/prefetcher/bin/prefetcher --help >/dev/null

# ---- runtime
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="image-prefetcher" \
      org.opencontainers.image.description="Pre-pulls container images onto Kubernetes nodes before pods need them (operator and node agent)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
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
