# One image for every app service (api, worker, beat, flower, migrate); the service's
# command comes from docker-compose.yml. Dependencies come from uv.lock, exactly.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY . .
RUN uv sync --frozen --no-dev

# Run as an unprivileged user; var/ holds beat's schedule and any SQLite file.
RUN useradd --system --create-home --uid 10001 renderwatch \
    && mkdir -p /app/var \
    && chown renderwatch:renderwatch /app/var
USER renderwatch

ENV PATH=/app/.venv/bin:$PATH
EXPOSE 8000 5555
CMD ["python", "-m", "api"]
