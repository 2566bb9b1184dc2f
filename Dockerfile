# syntax=docker/dockerfile:1
# One image for every app service (migrate, api, worker, beat, flower); the service's
# command comes from docker-compose.yml. Dependencies come from uv.lock, exactly
# (`uv sync --locked` fails when the lock does not match pyproject.toml).
#
# Two stages: the builder has uv and the build caches and installs the project (not
# editable) into /app/.venv; the runtime image gets that virtualenv and nothing else:
# no uv, no sources, no tests, benchmarks or CI files.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# uv's own image, pinned to the version the Makefile bootstraps.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/uv

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies first, in their own layer, from the lock alone: a change to the code or
# the README does not reinstall them. The cache mount keeps downloaded wheels between
# builds without putting them in a layer.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-dev --no-install-project

# Then the project itself (README.md: the package's long description).
COPY pyproject.toml uv.lock README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY renderwatch ./renderwatch
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/app/.venv/bin:$PATH

# Run as an unprivileged user; /app/var holds beat's schedule and any SQLite file.
RUN useradd --system --create-home --uid 10001 renderwatch \
    && mkdir -p /app/var \
    && chown renderwatch:renderwatch /app/var

COPY --from=builder /app/.venv /app/.venv

WORKDIR /app
USER renderwatch

EXPOSE 8000 5555
CMD ["python", "-m", "api"]
