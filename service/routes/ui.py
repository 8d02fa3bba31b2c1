"""/ui: the dashboard — static files served by the API process itself, no build step.

The page (service/ui/) speaks the same REST API as the CLI, with a token the user types in and
the browser keeps in session storage. Charts are drawn by plotly.js, served here from the
installed `plotly` wheel (``plotly/package_data/plotly.min.js``): nothing is fetched from a CDN,
so the dashboard works offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import UiAssetNotFound

router = APIRouter(tags=["dashboard"], include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The page may load only what this server serves; the plotly bundle needs inline styles.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-eval'; connect-src 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def plotly_bundle() -> Path | None:
    """plotly.min.js inside the installed `plotly` package (found without importing it)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    return None


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/ui")
def dashboard() -> FileResponse:
    """The dashboard's page."""
    return _file(UI_DIR / "index.html")


@router.get("/ui/")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/static/{name}")
def static_file(name: str) -> FileResponse:
    """The dashboard's own scripts and styles (a flat directory: no paths, no dot-files)."""
    path = UI_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise UiAssetNotFound(f"no dashboard file {name!r}")
    return _file(path)


@router.get("/ui/vendor/plotly.min.js")
def plotly_js() -> FileResponse:
    """The charting library, from the installed plotly wheel."""
    path = plotly_bundle()
    if path is None:
        raise UiAssetNotFound("plotly is not installed (pip install 'xsam[api]')")
    return _file(path)
