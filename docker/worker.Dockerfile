# The GPU worker: CUDA runtime + torch with CUDA, the models resident in memory.
# Build: docker build -f docker/worker.Dockerfile --build-arg MODELS=models .
# torch >= 2.6: transformers 5 and diffusers 0.42 disable torch below 2.6 ("Disabling PyTorch
# because PyTorch >= 2.6 is required"), which leaves a worker that cannot load any model.
# For older NVIDIA drivers (CUDA 12.4): --build-arg BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf-cache SELFCASCADE_DATA_DIR=/data
# /data (SELFCASCADE_DATA_DIR here, in compose and in Kubernetes) is created owned by the app
# user, so a named volume mounted there starts writable for uid 10001: Docker copies the image
# folder's ownership into a new volume, while a path missing from the image is made root-owned.
# A C compiler: Triton builds a small launcher with one when torch.compile first runs, and the
# PyTorch runtime images have none, so SELFCASCADE_TORCH_COMPILE_SCALE (set by the GPU overlay)
# would fall back to eager after paying for the tracing (pytorch/pytorch#116696).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 app \
    && mkdir -p /models/hf-cache /data && chown app /models /models/hf-cache /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY service ./service
COPY selfcascade ./selfcascade
COPY worker ./worker
# torch comes from the base image (CUDA build); pip keeps it because it satisfies torch>=2.6.
# The check fails the build when a BASE_IMAGE's torch is too old for transformers/diffusers.
RUN pip install '.[worker]' \
    && python -c "import torch, transformers.utils as t; assert t.is_torch_available(), torch.__version__"
COPY docker/worker_health.py /app/worker_health.py
# Models: --build-arg MODELS=models bakes the build context's ./models folder in at /app/models
# (/app is the working directory), where the settings look without a models file: the demo model
# (models/demo) and its upsamplers (models/demo-upsamplers-*.safetensors). The default bakes only
# a placeholder README (the worker then serves the tiny smoke-test model). Models can also be
# mounted there, or anywhere a models file (SELFCASCADE_MODELS_FILE) points.
ARG MODELS=docker/no-model
# MODEL_DIR (a single model folder, once baked at /models/baked) is gone: refuse it loudly.
ARG MODEL_DIR=
RUN if [ -n "$MODEL_DIR" ]; then echo "MODEL_DIR is gone: use --build-arg MODELS=models" >&2; exit 1; fi
COPY --chown=app ${MODELS} /app/models
USER app
# Healthy while the worker's presence key (re-published with a TTL by its heartbeat) exists;
# passes while Redis itself is unreachable (docker/worker_health.py says why).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "/app/worker_health.py", "liveness"]
# SIGTERM = warm shutdown: RQ finishes (or requeues) the current job, then exits.
STOPSIGNAL SIGTERM
# Names the worker <WORKER_NAME or hostname>-<random>, records the name for the health check and
# execs selfcascade-worker (extra arguments go to it).
CMD ["python", "/app/worker_health.py", "run"]
