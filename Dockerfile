# The exporter as a container: `usage-exporter serve` on 0.0.0.0:8080, data (spool, and the
# embedded store when no server DSN is given) under /data.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    USAGE_EXPORTER_HOST=0.0.0.0 \
    USAGE_EXPORTER_PORT=8080 \
    USAGE_EXPORTER_DATA_DIR=/data

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p exporter && touch exporter/__init__.py \
    && pip install . \
    && pip uninstall -y llm-usage-exporter \
    && rm -rf exporter
# The schema files live next to the package (clickhouse/*.sql is read from the source tree), so
# the package is installed in editable mode from /app.
COPY exporter ./exporter
COPY clickhouse ./clickhouse
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /data exporter \
    && mkdir -p /data && chown exporter /data

USER exporter
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["usage-exporter"]
CMD ["serve"]
