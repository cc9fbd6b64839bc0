# syntax=docker/dockerfile:1.7
#
# realign-serve image. Two variants from one file:
#
#   docker build -t realign-serve:gpu .                        # CUDA (default)
#   docker build -t realign-serve:cpu --build-arg BASE=cpu .   # CPU only, ~5x smaller
#
# Stages:  os-gpu | os-cpu  ->  os  ->  deps (venv with every dependency)
#                                   ->  wheel (the app itself)
#                                   ->  runtime (os + deps venv + app wheel + models/)
#
# The deps stage sees only pyproject.toml, so editing app/ reuses the multi-GB
# dependency layer (build cache *and* registry layer: pushes/pulls move only the
# small app layer). All configuration is REALIGN_* environment variables read at
# start-up (app/config.py); nothing is baked in except defaults for the paths below.

# --- build arguments (global: usable in FROM lines) ----------------------------------
ARG BASE=gpu
# torch from PyPI bundles its own CUDA and cuDNN libraries (pip packages nvidia-*), so
# the CUDA image only needs to provide the driver hook-up (NVIDIA_* variables, and the
# NVIDIA_REQUIRE_CUDA check that fails fast with a clear message on a too-old host driver).
# The "-base-" flavour does that without a second copy of cuDNN; a "-cudnn-runtime-" tag
# works as well, at about +1 GB.
# torch 2.14.1 on PyPI is a CUDA 13.0 build (needs host driver >= 580). For older drivers
# build with a cu12x wheel and a matching image, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
# Python 3.12 in both variants: it is Ubuntu 24.04's own python3 (security-maintained),
# and the slim image is matched to it. (The project supports Python >= 3.10.)
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# Same pins as the Makefile: torchvision must match torch exactly (open_clip imports it),
# and both must come from the same index or pip swaps the CPU torch for a CUDA one.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# --- OS + Python, one stage per variant ------------------------------------------------
FROM ${CUDA_IMAGE} AS os-gpu
ENV DEBIAN_FRONTEND=noninteractive
# Unpinned on purpose: the distribution's security updates should land on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
# Empty = PyPI, whose default torch wheel is the CUDA build.
ARG TORCH_INDEX_URL=""
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
# Which GPU features the NVIDIA container toolkit exposes: compute (CUDA) and
# utility (nvidia-smi, NVML) are all a text encoder needs.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${PYTHON_IMAGE} AS os-cpu
# PyTorch's CPU index: wheels without the ~4 GB of bundled CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}

# hadolint ignore=DL3006
FROM os-${BASE} AS os
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# --- dependencies: changes only when pyproject.toml (or the torch pins) change --------
FROM os AS deps
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
WORKDIR /src
COPY pyproject.toml ./
# 1. torch + torchvision first, from the variant's index;
# 2. then [project.dependencies] read from pyproject.toml (torch is already satisfied, so
#    pip keeps the variant's build). The app itself is installed in a later, small layer.
# (ensurepip's bundled pip can be old; any current one will do, hence unpinned.)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && pip install --upgrade pip \
 && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# --- the app as a wheel (rebuilt on every code change; seconds) -------------------------
FROM deps AS wheel
COPY README.md ./
COPY app ./app
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------------
FROM os AS runtime
ARG BASE
LABEL org.opencontainers.image.title="realign-serve" \
      org.opencontainers.image.description="Text -> pseudo-image embeddings (OpenCLIP + ReAlign)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.realign.variant="${BASE}"

# Unprivileged user with a fixed UID (Kubernetes runAsUser / fsGroup refer to it).
# Its ~/.cache points into the cache volume: open_clip downloads non-Hub checkpoints to
# ~/.cache/clip regardless of XDG_CACHE_HOME.
RUN groupadd --system --gid 10001 realign \
 && useradd --system --uid 10001 --gid realign --home-dir /home/realign --create-home \
        --shell /usr/sbin/nologin realign \
 && mkdir -p /cache/huggingface /cache/torch \
 && chown -R realign:realign /cache \
 && ln -s /cache /home/realign/.cache

# Layers from the least to the most often changed, so a code edit rebuilds only the last.
# 1 (large): the dependency venv.
COPY --from=deps /opt/venv /opt/venv
# 2: the demo model and its profiles. Real weights and profiles are mounted over
#    /models/weights and /models/profiles (docs/deployment.md).
COPY models /models
# 3 (small): the app.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps --no-cache-dir /wheels/*.whl

# Downloaded weights (REALIGN_ALLOW_DOWNLOADS=1) land here; a volume keeps them across
# container restarts and image upgrades.
# HF_HUB_OFFLINE=0: the `realign` CLI defaults it to 1 (tests never download), which would
# defeat REALIGN_ALLOW_DOWNLOADS=true; with downloads off, the encoder forces offline mode
# itself. So in the container REALIGN_ALLOW_DOWNLOADS is the one switch.
ENV HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=0 \
    XDG_CACHE_HOME=/cache \
    TORCH_HOME=/cache/torch \
    REALIGN_MODEL=local-dir:/models/demo \
    REALIGN_PROFILES_DIR=/models/profiles \
    REALIGN_HOST=0.0.0.0 \
    REALIGN_PORT=8000
VOLUME ["/cache"]

# Numeric, so that Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 10001:10001
WORKDIR /home/realign
EXPOSE 8000

# Liveness only (process up, event loop answering). Readiness (/readyz: model loaded and
# warmed up) is for load balancers and Kubernetes. start-period covers model loading.
# Python's urllib, so the image needs no curl; a non-2xx status raises -> exit 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REALIGN_PORT', '8000'), timeout=4)"]

# `docker run IMAGE` serves; `docker run IMAGE profile build ...` runs any other subcommand.
ENTRYPOINT ["realign"]
CMD ["serve"]
