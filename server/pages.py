"""The upload page: index.html and its two assets, from server/static/. Nothing outside
this list is served from that folder."""
from pathlib import Path

from flask import Blueprint, send_from_directory

from .errors import ApiError

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = ("app.js", "style.css")
# The page loads nothing from elsewhere; the chosen photo is previewed from a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    response = send_from_directory(STATIC, "index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@bp.get("/static/<name>")
def static_file(name):
    if name not in ASSETS:
        raise ApiError(404, "not_found", "no such file")
    return send_from_directory(STATIC, name)
