# The Ray node image: the Ray head (which also runs `xsam agent`, the Ray driver) and the GPU
# workers. torch 2.13.0 from PyPI is the CUDA build on Linux x86_64: the CUDA runtime, cuDNN and
# NCCL arrive as nvidia-* wheels, so the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit. Versions match pyproject.toml (tests/deploy/test_compose.py checks that they do).
# Built by docker-compose.yml for `ray-head` and `ray-worker`; the build context is the repository
# root.
FROM python:3.11-slim-bookworm

# A CUDA build other than PyPI's default: e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The same uid as in docker/api.Dockerfile: both images share the artifacts volume.
RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash xsam

WORKDIR /app

# torch first and pinned (the version the project is tested with), then the `agent` extra (train +
# ray[train]) against empty package stubs, so that this heavy layer survives code changes.
# ray[default] (same version) adds the dashboard, `ray status` and `ray list` for operators.
COPY pyproject.toml README.md ./
RUN pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && mkdir -p xsam service worker \
    && touch xsam/__init__.py service/__init__.py worker/__init__.py \
    && pip install ".[agent]" "ray[default,train]==2.60.0" \
    && pip uninstall --yes xsam-service \
    && rm -rf xsam service worker build ./*.egg-info

COPY xsam ./xsam
COPY service ./service
COPY worker ./worker
COPY cli ./cli
RUN pip install --no-deps . \
    && python -c "import torch, ray; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; assert ray.__version__ == '2.60.0', ray.__version__; import xsam.training, worker"

# Mount points owned by the service user, so named volumes mounted there start out writable by it
# (the data sets volume is mounted read-only; the GPU lock directory is shared by ray-worker
# replicas, see docker-compose.yml).
RUN mkdir -p /data /checkpoints /artifacts /gpu-locks \
    && chown xsam:xsam /data /checkpoints /artifacts /gpu-locks

USER xsam
# No CMD: docker-compose.yml gives the head and the workers their commands.
