# syntax=docker/dockerfile:1
# The celery-fleet operator image.
#   docker build -t ghcr.io/celery-fleet/celery-fleet:0.1.0 .
# Two stages on the same pinned base: `build` resolves nothing (every dependency comes from the
# hashed lock files, wheels only, so no compiler is needed or present) and the final stage gets
# just the virtualenv and the beat elector. Both stages must share the base: the venv links to
# its interpreter.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# pip and the pinned build tools live in a throwaway venv; the operator's venv gets no pip, no
# setuptools (nothing it needs at run time) and is filled with `pip --python`.
COPY requirements-build.lock ./
RUN python -m venv /tmp/build-venv \
 && /tmp/build-venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r requirements-build.lock \
 && python -m venv --without-pip /opt/celery-fleet/venv
# Dependencies next: this layer is reused until the lock file changes.
COPY requirements.lock ./
RUN /tmp/build-venv/bin/pip --python /opt/celery-fleet/venv/bin/python install \
      --require-hashes --only-binary=:all: --no-deps -r requirements.lock
# Our own wheel, installed without deps (they are all in the lock file already).
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN /tmp/build-venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /tmp/build-venv/bin/pip --python /opt/celery-fleet/venv/bin/python install --no-deps /tmp/wheels/celery_fleet-*.whl \
 && /tmp/build-venv/bin/pip --python /opt/celery-fleet/venv/bin/python check
# The elector as one standard-library-only file (a zipapp of celery_fleet.elector), where beat
# pods' init container copies it from (it runs as another UID in the user's image: mode 0444).
RUN /opt/celery-fleet/venv/bin/python -m celery_fleet.elector.bundle /opt/celery-fleet/elector.pyz

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="celery-fleet" \
      org.opencontainers.image.description="Kubernetes operator for Celery worker fleets" \
      org.opencontainers.image.source="https://github.com/celery-fleet/celery-fleet" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/celery-fleet/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/celery-fleet /opt/celery-fleet
# A fixed numeric UID, so runAsNonRoot can be checked without a passwd lookup.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8000 8080
ENTRYPOINT ["celery-fleet"]
CMD ["run"]
