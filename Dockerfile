# syntax=docker/dockerfile:1
# asyncsat in a container. Point it at a PostgreSQL with ASYNCSAT_DSN (compose.yaml does), or
# let it start the embedded one under /data (a volume), and mount the download destination.
#   docker build -t asyncsat .

# Build stage: wheels of asyncsat and of every dependency (compiled here when a platform has
# no binary wheel: the full image has the compilers).
FROM python:3.11-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY asyncsat ./asyncsat
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: the slim image (no compiler), the wheels installed, a numeric non-root user.
FROM python:3.11-slim-bookworm
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/asyncsat-*.whl \
    && groupadd --system --gid 10001 asyncsat \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home asyncsat \
    && mkdir -p /data \
    && chown 10001:10001 /data
USER 10001:10001
ENV ASYNCSAT_HOME=/data \
    ASYNCSAT_DEST=/data/downloads \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /data
VOLUME ["/data"]
# SIGTERM (docker stop): stop claiming, park transfers resumably, exit 0 within the shutdown
# timeout (8 s by default; docker waits 10 s before SIGKILL)
STOPSIGNAL SIGTERM
# exit 0 when the database answers and a daemon serves it
HEALTHCHECK --interval=60s --timeout=20s --start-period=30s --retries=3 \
    CMD ["asyncsat", "check"]
ENTRYPOINT ["asyncsat"]
CMD ["run"]
