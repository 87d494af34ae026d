# The GPU worker: CUDA runtime + torch with CUDA, the models resident in memory.
# Build: docker build -f docker/worker.Dockerfile --build-arg MODEL_DIR=models/demo .
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf-cache
RUN useradd --create-home --uid 10001 app && mkdir -p /models && chown app /models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY service ./service
COPY selfcascade ./selfcascade
COPY worker ./worker
# torch comes from the base image (CUDA build); pip keeps it because it satisfies torch>=2.4.
RUN pip install '.[worker]'
# Models are mounted under /models at run time, or baked in from a build-context folder
# (--build-arg MODEL_DIR=models/demo); the default bakes only a placeholder README.
ARG MODEL_DIR=docker/no-model
COPY --chown=app ${MODEL_DIR} /models/baked
USER app
# The worker's liveness is its RQ heartbeat; this check fails when the process cannot reach Redis.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, redis; redis.Redis.from_url(os.environ['SELFCASCADE_REDIS_URL']).ping()" || exit 1
# SIGTERM = warm shutdown: RQ finishes (or requeues) the current job, then exits.
STOPSIGNAL SIGTERM
CMD ["selfcascade-worker"]
