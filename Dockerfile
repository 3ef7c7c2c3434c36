# syntax=docker/dockerfile:1
# The Turnout gateway: `docker build -t turnout .`, then run it with a config mounted at
# /etc/turnout/config.yaml and secrets as environment variables, e.g.
#   docker run -p 8080:8080 -v "$PWD/examples/quickstart.yaml:/etc/turnout/config.yaml:ro" turnout
# The Helm chart (helm/turnout) mounts its ConfigMap there. vLLM runs from vLLM's own image.

# ---- builder: a wheel of the project, installed with its runtime dependencies in a venv ----
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# What the wheel is built from, and nothing else (.dockerignore keeps the rest out too).
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY router/ router/
COPY serving/ serving/
# Every dependency ships binary wheels for CPython 3.11 on Linux: no compiler is needed.
RUN python -m venv /opt/venv \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir /wheels/turnout-*.whl

# ---- runtime: the interpreter, the venv, a non-root user; no compiler, sources or tests ----
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="turnout" \
      org.opencontainers.image.description="OpenAI-compatible LLM gateway: routes, measures and A/B tests fine-tuned vs prompted models" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}"

RUN groupadd --system --gid 10001 turnout \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin turnout

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8080

# Alive = /healthz answers 200 (slim has no curl: Python's urllib asks).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["turnout", "serve", "-c", "/etc/turnout/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
