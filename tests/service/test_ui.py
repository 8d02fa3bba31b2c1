"""The dashboard's files over HTTP: served by the API itself, nothing from another origin."""

from __future__ import annotations

import re

import pytest


@pytest.fixture(params=["sqlite"])
def db_url(request, _templates, tmp_path):
    # No database work here: one backend is enough.
    import shutil

    target = tmp_path / "xsam.db"
    shutil.copyfile(_templates["sqlite"], target)
    return f"sqlite:///{target}"


def test_the_page_its_scripts_and_plotly_are_served_without_a_token(client):
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    # Same origin only ("data:," is the empty favicon, which spares a 404 in the console).
    assert sources and all(s.startswith(("/ui/", "#", "data:")) for s in sources), sources
    for src in sources:
        if src.startswith("/ui/"):
            assert client.get(src).status_code == 200, src
    plotly = client.get("/ui/vendor/plotly.min.js")
    assert plotly.status_code == 200 and "plotly" in plotly.text[:2000].lower()
    script = client.get("/ui/static/dashboard.js").text
    # The token stays in session storage: never in a cookie, never in a URL.
    assert "sessionStorage" in script and "document.cookie" not in script
    assert "localStorage" not in script and "token=" not in script
    assert not re.search(r"https?://", script)


@pytest.mark.parametrize(
    "path",
    [
        "/ui/static/.hidden.js",  # a dot-file
        "/ui/static/nope.js",  # no such file
        "/ui/static/..%2Fapp.py",  # out of the directory
        "/ui/static/README.md",  # not a kind of file the page uses
    ],
)
def test_only_the_dashboards_files_are_served(client, path):
    assert client.get(path).status_code == 404
