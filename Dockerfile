# asyncsat in a container. Point it at a PostgreSQL with ASYNCSAT_DSN, or let it start the
# embedded one under /data (a volume), and mount the download destination.
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 asyncsat
WORKDIR /app
COPY pyproject.toml README.md ./
COPY asyncsat ./asyncsat
RUN pip install --no-cache-dir . && mkdir -p /data && chown asyncsat /data
USER asyncsat
ENV ASYNCSAT_HOME=/data ASYNCSAT_DEST=/data/downloads PYTHONUNBUFFERED=1
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=60s --timeout=20s CMD ["asyncsat", "check"]
ENTRYPOINT ["asyncsat"]
CMD ["run"]
