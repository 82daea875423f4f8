"""Every error the server answers, as JSON: {"error": {"code", "message"}} with a 4xx status
for bad input, 503 (with Retry-After) when the worker is busy, 500 for a bug."""
from flask import current_app, jsonify, request
from werkzeug.exceptions import HTTPException

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type"}


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status, code, message):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def api_error(e: ApiError):
    response = error_response(e.status, e.code, e.message)
    if e.status == 503:
        response.headers["Retry-After"] = "1"
    return response


def http_error(e: HTTPException):
    """werkzeug's errors (404, 405, 413, ...) in our JSON shape, with a message that says
    which limit a 413 is about."""
    message = e.description
    if e.code == 413:
        length, limit = request.content_length, current_app.config["MAX_CONTENT_LENGTH"]
        if length is not None and length <= limit:  # werkzeug's form limits, not the body's size
            message = (f"the form has too many parts (limit {request.max_form_parts}) or a text field "
                       f"over {request.max_form_memory_size:,} bytes; send images as files")
        else:
            message = f"request body over the limit of {limit:,} bytes"
        _drain(request, current_app.config["MAX_DRAIN_BYTES"])
    response = error_response(e.code, HTTP_CODES.get(e.code, "http_error"), message)
    if e.code == 405 and getattr(e, "valid_methods", None):
        response.headers["Allow"] = ", ".join(e.valid_methods)
    return response


def internal_error(e: Exception):
    current_app.logger.exception("unhandled error")
    return error_response(500, "internal_error", "internal error while captioning; the server is still up")


def _drain(request, limit):
    """Read and drop the rest of an over-limit body (up to `limit` bytes), so that a client
    that sends it all before reading gets the 413 instead of a broken pipe."""
    length = request.content_length
    if length is None or length > limit:
        return  # too big (or unknown) to read: the server closes the connection after answering
    stream = request.environ["wsgi.input"]
    try:
        while stream.read(65536):
            pass
    except OSError:
        pass
