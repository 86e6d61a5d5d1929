# syntax=docker/dockerfile:1
# optimizr's image: `optimizr` itself (the entrypoint), and the Dask scheduler and worker of
# a cluster run (`dask scheduler`, `dask worker`: the `cluster` extra). README, "Deployment".
#
#   docker build -t optimizr .
#   docker run --rm -v "$PWD/photos:/data/in:ro" -v "$PWD/webp:/data/out" optimizr convert in out
#
# Where no base image can be pulled, `make image` builds this same file on a Debian
# bookworm base that it makes with debootstrap, passed as BASE_IMAGE.

# Any Debian-like image with python3 (3.11 or later) and its venv module: the official
# python:3.11-slim, or debootstrap's bookworm with python3-venv and ca-certificates.
# Only `python3` is used below, never `python` or a system pip: Debian's own python3 has
# neither `python` nor pip, and refuses pip installs outside a venv (PEP 668).
ARG BASE_IMAGE=python:3.11-slim

# ---- build: optimizr's wheel from this checkout -------------------------------------
FROM ${BASE_IMAGE} AS build
# Builds behind a TLS-intercepting proxy: the path, inside the build, of a CA bundle for
# pip (`make image` mounts this machine's bundle over the base's and names it here).
# Empty, as for a plain `docker build`: pip's own certificates. Not kept in the image.
ARG PIP_CERT=
WORKDIR /src
# .dockerignore lets in only these: the wheel needs pyproject.toml, the README (the
# package's long description) and src/.
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY src ./src
# The metric's loops are C (setup.py: src/optimizr/_ssimulacra2.c): this stage gets a
# compiler and Python's headers (python:3.11-slim has the headers; Debian's python3 needs
# python3-dev); the runtime stage gets only the wheel's compiled module.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
      $(python3 -c 'import os, sysconfig; print("" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "python3-dev")') \
 && rm -rf /var/lib/apt/lists/*
# pip fetches setuptools from PyPI into its isolated build environment; the wheel holds
# optimizr alone (--no-deps): its dependencies are the runtime stage's business.
RUN python3 -m venv /tmp/build-venv \
 && /tmp/build-venv/bin/pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: the wheel and its dependencies from PyPI, run as a non-root user --------
FROM ${BASE_IMAGE} AS runtime
ARG PIP_CERT=

# /opt/optimizr is a venv: one folder holds optimizr, libvips (pyvips-binary), Pillow's
# libwebp, pillow-heif's libheif, obstore and Dask, all manylinux wheels that carry
# their own shared libraries, so the base needs nothing but Python and CA certificates.
# pyvips itself is an sdist on PyPI (pure Python): pip builds it here, no compiler needed.
ENV PATH=/opt/optimizr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Two layers: the dependencies, read from pyproject.toml alone (its dependencies and the
# cluster and tracing extras: a worker exports its spans itself), then optimizr's wheel
# without them. A change to the code then rebuilds only the second, in seconds; the
# first is redone only when pyproject.toml changes.
# The cache mount keeps pip's downloads and the pyvips wheel it builds between builds
# without putting them in a layer. The venv stays root-owned, so the user that runs the
# image cannot change the code it runs.
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/optimizr \
 && python3 -c 'import tomllib; project = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; extras = project["optional-dependencies"]; print("\n".join(project["dependencies"] + extras["cluster"] + extras["tracing"]))' \
      > /tmp/requirements.txt \
 && pip install --requirement /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt

COPY --from=build /wheels /tmp/wheels
# pip check: every installed distribution has what it requires, optimizr included.
RUN pip install --no-deps /tmp/wheels/optimizr-*.whl \
 && rm -rf /tmp/wheels \
 && pip check \
 && optimizr --version \
 && optimizr --version | grep -q '^SSIMULACRA 2.1 (--target-score): C (' \
 && dask --version

# A fixed uid/gid, so that bind-mounted folders can be given to it (chown 10001) and
# Kubernetes' runAsNonRoot can check it from the image. Its home holds Dask's config and
# the remote DESTs' state folders, ~/.cache/optimizr: made here, owned by the user, so a
# volume mounted there starts with that owner (docker-compose.yml mounts one); /data is
# the working directory for mounted libraries; Dask workers spill to /tmp.
RUN groupadd --gid 10001 optimizr \
 && useradd --uid 10001 --gid optimizr --home-dir /home/optimizr --create-home --no-log-init \
      --shell /usr/sbin/nologin optimizr \
 && install -d -o optimizr -g optimizr /data /home/optimizr/.cache /home/optimizr/.cache/optimizr
USER 10001:10001
WORKDIR /data

# 8786: the Dask scheduler; 9090: the --metrics-port of docker-compose.yml. (No 8787:
# the Dask dashboard needs bokeh, which the image leaves out.)
EXPOSE 8786 9090
ENTRYPOINT ["optimizr"]
CMD ["--help"]
