"""The upload page (index.html and its two assets) and the API reference page (/docs:
Swagger UI from the `swagger-ui-bundle` package, on /openapi.json), from server/static/
and that package. Nothing outside these lists is served from either folder."""
from pathlib import Path

from flask import Blueprint, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from .errors import ApiError

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = ("app.js", "style.css")
# /docs/<name>: our initializer, then the Swagger UI files it loads.
DOCS_ASSETS = {"docs.js": STATIC}
DOCS_ASSETS.update({name: Path(swagger_ui_path) for name in ("swagger-ui-bundle.js", "swagger-ui.css",
                                                            "favicon-32x32.png")})
# Both pages load nothing from elsewhere. The chosen photo is previewed from a blob: URL;
# Swagger UI's style sheet draws its icons from data: URLs and its "try it out" calls this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

bp = Blueprint("pages", __name__)


def _page(name):
    """An HTML page of STATIC, under the page's Content-Security-Policy."""
    response = send_from_directory(STATIC, name)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@bp.get("/")
def index():
    return _page("index.html")


@bp.get("/static/<name>")
def static_file(name):
    if name not in ASSETS:
        raise ApiError(404, "not_found", "no such file")
    return send_from_directory(STATIC, name)


@bp.get("/docs")
def docs():
    return _page("docs.html")


@bp.get("/docs/<name>")
def docs_file(name):
    if name not in DOCS_ASSETS:
        raise ApiError(404, "not_found", "no such file")
    return send_from_directory(DOCS_ASSETS[name], name)
