# GPU worker image: the distill library, its `distill` CLI and the Prefect flows on a CUDA base.
#
#   docker build -t distill-worker .
#   docker run --rm --gpus all --shm-size 16g distill-worker distill --help
#
# As a Prefect `docker` work pool's image, the worker runs `prefect flow-run execute` in it
# (no ENTRYPOINT, so the worker's command runs as given); the flows are installed as the
# `flows` package and their source sits in the working directory /opt/distill ($DISTILL_HOME,
# writable by the image's user for runs/), so deployment entrypoints may be either
# `flows/<file>.py:<flow>` or `flows.<module>.<flow>`.
#
# Build arguments:
#   BASE_IMAGE       a CUDA image with apt (Debian/Ubuntu). If it already holds a virtualenv at
#                    /opt/venv whose torch satisfies TORCH_SPEC, that torch is kept (no download).
#   TORCH_SPEC       the torch requirement; a range that torch 2.13.0 satisfies, as in pyproject.toml.
#   TORCH_INDEX_URL  where torch comes from. PyPI's Linux torch is a CUDA 13 build (driver >= 580);
#                    for an older driver, e.g. https://download.pytorch.org/whl/cu128 with a CUDA 12.8 base.
#   APP_UID          the numeric user id the image runs as (not 1000: Ubuntu 24.04 images have `ubuntu` there).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch>=2.4,<2.15"
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG APP_UID=10001
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python, plus a C toolchain and Python headers: triton (torch.compile) and DeepSpeed's CPU ops
# compile small extensions at run time. (DeepSpeed's CUDA ops would also need nvcc, i.e. a
# -devel base; distill's optimizers are torch's AdamW and need none.) The venv is created
# unless the base image brings one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && if [ ! -x /opt/venv/bin/python ]; then python3 -m venv /opt/venv; fi \
    && groupadd --gid "${APP_UID}" distill \
    && useradd --no-log-init --create-home --uid "${APP_UID}" --gid "${APP_UID}" distill

# torch first, so that DeepSpeed builds against it; DeepSpeed without prebuilt ops (they build
# just in time where needed) and against the installed torch, not an isolated download of one.
# TORCH_SPEC is a build argument (by default a range, like every requirement here), which
# hadolint cannot read through.
# hadolint ignore=DL3013
RUN pip install "pip>=23.1" "setuptools>=77" \
    && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.19,<0.20"

WORKDIR /opt/distill
# deploy/prefect.yaml's and gpu.yaml's pull step changes into $DISTILL_HOME: here, the project in the image.
ENV DISTILL_HOME=/opt/distill

# The project's dependencies from pyproject.toml alone: installing the project with no source
# and a blank README pulls them in, then the empty project is removed. A code or README edit
# therefore rebuilds from the COPY below, not from here.
COPY pyproject.toml ./
RUN touch README.md \
    && pip install . \
    && pip uninstall --yes distill \
    && rm -rf README.md build ./*.egg-info

COPY README.md ./
COPY configs ./configs
COPY flows ./flows
COPY distill ./distill
RUN pip install . \
    && rm -rf build ./*.egg-info \
    && chown "${APP_UID}:${APP_UID}" /opt/distill

USER ${APP_UID}
CMD ["distill", "--help"]
