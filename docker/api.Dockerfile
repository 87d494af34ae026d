# The API image: FastAPI + RQ client, no torch (a few hundred MB instead of several GB).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SELFCASCADE_DATA_DIR=/data
# /data (SELFCASCADE_DATA_DIR: local results, when the storage backend is local) is created owned
# by the app user, so a volume mounted there starts writable for uid 10001 (a path missing from
# the image would be created root-owned).
RUN useradd --create-home --uid 10001 app && mkdir -p /data && chown app /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY service ./service
# The package layout lists selfcascade/ and worker/ too; the API extra never imports them.
COPY selfcascade ./selfcascade
COPY worker ./worker
RUN pip install '.[api]' && python -c "import service.app, sys; assert 'torch' not in sys.modules"
USER app
ENV SELFCASCADE_HOST=0.0.0.0 SELFCASCADE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["selfcascade-api"]
