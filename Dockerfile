# One image for the three services; the command chooses one:
#   python -m services.ingest | services.meter | services.billing   (serve)
#   python -m services.<name> migrate                             (apply migrations, exit)
# Configuration is environment variables only (README "Configuration").
#
#   docker build -t usage-billing:0.1.0 .

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/runtime.lock requirements/runtime.lock
# requirements/runtime.lock pins exactly what the services import and every
# dependency of those (`make lock`): --no-deps installs that set and nothing
# else, pip check proves it complete. Binary wheels only: no compiler needed.
# CI runs this stage's commands, from this file, on this lock and starts every
# service from the result (tools/image_check.py, `make image-check`).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps --only-binary=:all: -r requirements/runtime.lock \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip setuptools
COPY services/ /app/services/
COPY usagebilling/ /app/usagebilling/
# Byte-code compiled now, since the running container may not write it
# (read-only root filesystem); unchecked-hash: valid whatever the file times.
RUN /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /app

FROM python:3.11-slim-bookworm
# A fixed numeric user, so that Kubernetes can verify runAsNonRoot (10001, as
# the manifests' runAsUser).
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001:10001
# The source revision, for usagebilling_build_info's label:
#   docker build --build-arg REVISION=$(git rev-parse --short HEAD) ...
ARG REVISION=unknown
ENV USAGEBILLING_REVISION=${REVISION}
# gRPC: ingest, meter, billing; Prometheus metrics.
EXPOSE 50051 50052 50053 9090
# No default service: the command says which one to run.
CMD ["python", "-c", "raise SystemExit('usage: python -m services.<ingest|meter|billing> [migrate]')"]
