# GPU worker image: the distill library and its launcher on a CUDA base.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t distill-worker .
#   docker run --gpus all --shm-size 16g distill-worker distill --help
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# torch first, so that deepspeed builds against it; a range torch 2.13 satisfies.
ARG TORCH_SPEC="torch>=2.4,<2.15"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/distill
RUN pip install "${TORCH_SPEC}" \
    && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.19,<0.20"
COPY pyproject.toml README.md ./
COPY distill ./distill
COPY flows ./flows
COPY configs ./configs
RUN pip install .

RUN useradd --create-home --uid 1000 distill
USER distill
WORKDIR /home/distill
CMD ["distill", "--help"]
