"""``/docs``: Swagger UI served from files shipped in the package, so it works offline.

FastAPI's own ``/docs`` loads Swagger UI's script and stylesheet from a CDN and is a blank
page on a machine without internet. This one serves the vendored swagger-ui-dist bundle
(version and licence in ``static/swagger-ui/README.md``) under ``/static/swagger-ui``, and
turns off Swagger UI's online validator badge (a request to validator.swagger.io). ReDoc
(``/redoc``), which exists only as a CDN script, is not served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_UI_FILES = Path(__file__).parent / "static" / "swagger-ui"
SWAGGER_UI_PATH = "/static/swagger-ui"


def install(app: FastAPI) -> None:
    """Add ``/docs`` and the static files it loads (the app is made with ``docs_url=None``)."""
    app.mount(SWAGGER_UI_PATH, StaticFiles(directory=SWAGGER_UI_FILES), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy's path prefix
        assets = root + SWAGGER_UI_PATH
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )
