# returner: saves rendered frames from POSIX shared memory as JPEGs.
#
#   docker build --build-arg UID="$(id -u renderer)" --build-arg GID="$(id -g renderer)" -t returner .
#
# The renderer creates its shared-memory segments with mode 0600, so this container
# must run as the renderer's UID (build args below) and share the renderer's IPC
# namespace (compose.yaml: `ipc: shareable` here, `ipc: "service:returner"` there).

# ---- build: install the package and its dependencies into a virtualenv ----
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
# README.md is the package's long description (pyproject.toml: readme).
COPY pyproject.toml README.md ./
COPY returner ./returner
# The console extra too: `returner console` runs from the same image (compose.yaml,
# deploy/kubernetes/console.yaml).
RUN pip install --no-cache-dir "returner[console,s3] @ file:///src"

# ---- runtime: the virtualenv only, run as the renderer's user ----
FROM python:3.11.14-slim-bookworm

# The renderer's UID and GID: segments are mode 0600, so only that user may open them.
ARG UID=1000
ARG GID=1000

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTPUT_DIR=/app/output/translated \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9108

# --non-unique: the renderer's IDs may already name a user or group of the base image.
# (RUN uses /bin/sh, i.e. dash, where UID is an ordinary variable, unlike in bash.)
RUN groupadd --non-unique --gid "${GID}" returner \
    && useradd --non-unique --no-log-init --uid "${UID}" --gid "${GID}" \
        --home-dir /app --no-create-home --shell /usr/sbin/nologin returner \
    && mkdir -p /app/output/translated \
    && chown -R "${UID}:${GID}" /app

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER ${UID}:${GID}

EXPOSE 9108
STOPSIGNAL SIGTERM

# /healthz: 200 while the worker loop ticks and Redis answers, 503 otherwise
# (urlopen raises on 503). No curl in the slim image, so Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + (os.environ.get('METRICS_PORT') or '9108') + '/healthz', timeout=4)"]

ENTRYPOINT ["returner"]
CMD ["run"]
