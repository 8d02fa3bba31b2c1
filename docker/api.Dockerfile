# The API image: the REST API and the Alembic migrations, with only the `api` extra installed —
# no torch and no ray (service/ never imports them; a build step below proves they are absent).
# Built by docker-compose.yml for the `api` and `migrate` services; the build context is the
# repository root.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uid as in docker/ray.Dockerfile: both images share the artifacts volume.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin xsam

WORKDIR /app

# Dependencies first, in a layer that code changes do not invalidate: install the project's `api`
# extra from pyproject.toml against empty package stubs, then drop the stub install.
COPY pyproject.toml README.md ./
RUN mkdir -p xsam service worker \
    && touch xsam/__init__.py service/__init__.py worker/__init__.py \
    && pip install ".[api]" \
    && pip uninstall --yes xsam-service \
    && rm -rf xsam service worker build ./*.egg-info

COPY alembic.ini ./
COPY migrations ./migrations
COPY xsam ./xsam
COPY service ./service
COPY worker ./worker
COPY cli ./cli
# Editable: `xsam serve` applies the migrations from the source tree (service/db/migrate.py finds
# alembic.ini and migrations/ next to service/), so the code stays where they are.
RUN pip install --no-deps --editable . \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'ray') if u.find_spec(m)]; sys.exit(f'the API image must not contain {bad}' if bad else 0)" \
    && python -c "import fastapi, sqlalchemy, alembic, psycopg, service.app" \
    && python -c "from service.routes.ui import plotly_bundle; assert plotly_bundle(), 'the dashboard needs plotly.min.js'"

# Mount points owned by the service user, so named volumes mounted there start out writable by it.
RUN mkdir -p /var/lib/xsam /artifacts && chown xsam:xsam /var/lib/xsam /artifacts

USER xsam
EXPOSE 8000
# python and urllib rather than curl, which the slim image lacks. XSAM_API_PORT follows the port
# the compose file gives `xsam serve`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('XSAM_API_PORT', '8000'), timeout=4)"]
CMD ["xsam", "serve", "--no-agent", "--host=0.0.0.0", "--port=8000"]
