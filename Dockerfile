# syntax=docker/dockerfile:1

# ---- builder: turn the project and all its dependencies into wheels ------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ ./service/

# Builds the project's wheel and collects a wheel for every dependency, the Dask extra
# included (the same image runs the Dask scheduler and workers). Each of them ships a
# manylinux or pure-Python wheel for CPython 3.11, so the builder needs no compiler either.
RUN pip wheel --no-cache-dir --prefer-binary --wheel-dir /wheels ".[dask]"

# ---- runtime: only the wheels, a non-root user and the sample dataset ------------------
FROM python:3.11-slim-bookworm AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ETL_DATA_DIR=/data \
    ETL_HOST=0.0.0.0 \
    ETL_PORT=8080

RUN groupadd --system --gid 10001 etl \
    && useradd --system --uid 10001 --gid etl --create-home --home-dir /home/etl \
       --shell /usr/sbin/nologin etl \
    && install -d -o etl -g etl /var/lib/experiment-etl/spill

COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

WORKDIR /app
# The bundled sample dataset, where the take-home's `docker run IMAGE -d /data ...` looks
# (compose mounts ./data over it). It stays owned by root: the service only reads it.
COPY data/ /data/

# Numeric ids (the "etl" user created above) so Kubernetes runAsNonRoot can verify them.
USER 10001:10001

EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; r = urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

STOPSIGNAL SIGTERM

# service/entrypoint.py: no arguments or `serve` serve the API (on ETL_HOST:ETL_PORT);
# arguments starting with a dash are `run` flags (`-d /data -db exampledb ...`): one ETL run,
# exit 0 or 1; any other experiment-etl command (show, run, generate) runs as given.
ENTRYPOINT ["python", "-m", "service.entrypoint"]
CMD ["serve"]
