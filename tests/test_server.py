"""The Flask app through its test client: every route, every bad input."""
import io

import numpy as np
import pytest
from conftest import image_bytes, png_1bit
from PIL import Image

from server.app import create_app


@pytest.fixture(scope="module")
def app(tiny_captioner):
    return create_app({"CAPTIONER": tiny_captioner, "MAX_CONTENT_LENGTH": 2 * 1024 * 1024, "MAX_FILES": 3})


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, files=(), query="", **kw):
    data = {"image": [(io.BytesIO(b), name, *([t] if t else [])) for name, b, t in files]} if files else {}
    return client.post(f"/v1/captions{query}", data=data, content_type="multipart/form-data", **kw)


def wait_ready(client, seconds=30):
    """/readyz once the app's background warm-up is done (503 until then)."""
    import time

    deadline = time.monotonic() + seconds
    while (ready := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return ready


def assert_error(response, status, code=None):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]["message"]


def test_caption_one_and_many(client, photos):
    r = post(client, [("cat.jpg", image_bytes(photos["cat"]), None)], "?beam_size=3&n_best=3")
    assert r.status_code == 200
    body = r.get_json()
    assert body["model"] and body["elapsed_ms"] >= 0
    (result,) = body["results"]
    assert result["filename"] == "cat.jpg" and result["caption"] and isinstance(result["score"], float)
    assert len(result["alternatives"]) == 2
    assert result["objects"][0]["word"] == "cat" and result["objects"][0]["label"] and result["objects"][0]["p"] > 0.5
    r = post(client, [("a.png", image_bytes(photos["coffee"], "PNG"), "image/png"),
                      ("b.jpg", image_bytes(photos["rocket"]), None)])
    assert [x["filename"] for x in r.get_json()["results"]] == ["a.png", "b.jpg"]


def test_raw_image_body_and_form_options(client, photos):
    r = client.post("/v1/captions?n_best=2", data=image_bytes(photos["cat"]), content_type="image/jpeg")
    assert r.status_code == 200 and len(r.get_json()["results"][0]["alternatives"]) == 1
    r = client.post("/v1/captions", data={"image": (io.BytesIO(image_bytes(photos["cat"])), "c.jpg"),
                                          "beam_size": "1", "max_length": "3"},
                    content_type="multipart/form-data")
    assert r.status_code == 200 and len(r.get_json()["results"][0]["caption"].split()) <= 3


def _odd_images(photos):
    cat = photos["cat"]
    frames = [cat.convert("P"), Image.new("P", cat.size)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "cmyk.jpg": image_bytes(cat.convert("CMYK")),
        "grey.png": image_bytes(cat.convert("L"), "PNG"),
        "16bit.png": image_bytes(Image.fromarray((np.asarray(cat.convert("L"), np.uint16) * 257)), "PNG"),
        "palette.png": image_bytes(cat.convert("P"), "PNG"),
        "rgba.png": image_bytes(cat.convert("RGBA"), "PNG"),
        "anim.gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rotated.jpg": image_bytes(cat, "JPEG", exif=exif),
        "webp.webp": image_bytes(cat, "WEBP"),
    }


def test_odd_but_valid_images_are_captioned(client, photos):
    for name, data in _odd_images(photos).items():
        r = post(client, [(name, data, None)])
        assert r.status_code == 200, (name, r.get_json())
        assert r.get_json()["results"][0]["caption"]


def test_bad_images_are_400(client, photos):
    good = image_bytes(photos["cat"])
    cases = {
        "empty.jpg": b"",
        "random.bin": np.random.default_rng(0).bytes(3000),
        "truncated.jpg": good[: len(good) // 3],
        "text.png": b"just some text",
        "bomb.png": png_1bit(30000, 30000),
    }
    codes = {"empty.jpg": "empty_file"}
    for name, data in cases.items():
        message = assert_error(post(client, [(name, data, None)]), 400, codes.get(name, "invalid_image"))
        assert name in message
    assert "too large" in assert_error(post(client, [("bomb.png", png_1bit(30000, 30000), None)]), 400)
    # One bad file fails the request and names the file; nothing is half-done.
    assert "bad.jpg" in assert_error(post(client, [("ok.jpg", good, None), ("bad.jpg", b"nope", None)]), 400)


def test_request_shape_errors(client, photos):
    good = image_bytes(photos["cat"])
    assert_error(client.post("/v1/captions"), 400, "missing_image")
    assert_error(client.post("/v1/captions", data={"other": "x"}, content_type="multipart/form-data"), 400,
                 "missing_image")
    assert_error(client.post("/v1/captions", data=b"", content_type="image/png"), 400, "empty_file")
    assert_error(client.post("/v1/captions", data=b'{"a": 1}', content_type="application/json"), 415)
    assert_error(post(client, [("notes.txt", b"hello", "text/plain")]), 415, "unsupported_media_type")
    assert_error(post(client, [(f"{i}.jpg", good, None) for i in range(4)]), 400, "too_many_files")
    big = np.random.default_rng(0).bytes(3 * 1024 * 1024)
    assert_error(client.post("/v1/captions", data=big, content_type="image/jpeg"), 413, "too_large")
    assert_error(post(client, [("big.jpg", big, None)]), 413)


def test_chunked_body_over_the_limit_is_413(client, photos):
    """A chunked body has no Content-Length for werkzeug to check up front, and werkzeug
    silently cuts it off at the limit; the app must still answer 413, not caption a stub."""
    chunked = {"wsgi.input_terminated": True}  # what gunicorn says for a chunked body
    big = np.random.default_rng(0).bytes(3 * 1024 * 1024)
    r = client.post("/v1/captions", input_stream=io.BytesIO(big), content_type="image/jpeg",
                    headers={"Transfer-Encoding": "chunked"}, environ_base=chunked)
    assert_error(r, 413, "too_large")
    good = image_bytes(photos["cat"])
    r = client.post("/v1/captions", input_stream=io.BytesIO(good), content_type="image/jpeg",
                    headers={"Transfer-Encoding": "chunked"}, environ_base=chunked)
    assert r.status_code == 200, r.get_json()


def test_image_decoding_takes_turns(tiny_captioner, photos, monkeypatch):
    """At most MAX_CONCURRENT_DECODES images are decoded at once per worker, so a burst of
    huge (but legal) images cannot take a worker's memory all at once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import server.api

    app = create_app({"CAPTIONER": tiny_captioner, "MAX_CONCURRENT_DECODES": 2})
    lock, now, peak = threading.Lock(), [0], [0]
    real_load_image = server.api.load_image

    def slow_load_image(*a, **k):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        try:
            return real_load_image(*a, **k)
        finally:
            with lock:
                now[0] -= 1
    monkeypatch.setattr(server.api, "load_image", slow_load_image)
    data = image_bytes(photos["cat"].resize((64, 64)))
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: post(app.test_client(), [("c.jpg", data, None)]).status_code, range(6)))
    assert statuses == [200] * 6 and peak[0] == 2


@pytest.mark.parametrize("query,option", [
    ("?beam_size=0", "beam_size"), ("?beam_size=11", "beam_size"), ("?beam_size=abc", "beam_size"),
    ("?n_best=6", "n_best"), ("?beam_size=2&n_best=3", "n_best"), ("?max_length=0", "max_length"),
    ("?max_length=1000", "max_length"), ("?grounding=maybe", "grounding"),
    ("?concept_threshold=2", "concept_threshold"),
    ("?max_concepts=-1", "max_concepts"),
])
def test_bad_options_name_the_option(client, photos, query, option):
    message = assert_error(post(client, [("c.jpg", image_bytes(photos["cat"]), None)], query), 400, "invalid_option")
    assert option in message


def test_unknown_route_and_wrong_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/captions"), 405, "method_not_allowed")
    assert_error(client.delete("/healthz"), 405)
    assert_error(client.get("/static/../app.py"), 404)


def test_health_ready_metrics(client, photos):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = wait_ready(client)
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"
    assert ready.get_json()["backend"] in ("torch", "torch-bf16", "onnx")  # auto: never one that costs quality
    post(client, [("c.jpg", image_bytes(photos["cat"]), None)])
    post(client, [("c.jpg", b"", None)])
    text = client.get("/metrics").get_data(as_text=True)
    assert 'captioner_http_requests_total{route="/v1/captions",status="200"}' in text
    assert 'captioner_http_requests_total{route="/v1/captions",status="400"}' in text
    assert "captioner_http_request_seconds_bucket" in text
    assert "captioner_images_captioned_total" in text and "captioner_batch_images_count" in text


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and b'id="file"' in page.data
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "http" not in csp
    assert b"http://" not in page.data and b"https://" not in page.data  # no external assets
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and b"http" not in asset.data
    assert b"/v1/captions" in client.get("/static/app.js").data


def test_openapi_matches_routes(app, client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == served
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return
    validate(spec)


def test_nothing_written_to_disk(client, photos, tmp_path, monkeypatch):
    """Uploads (even over werkzeug's 500 KB spooling threshold) stay in memory."""
    import tempfile

    import werkzeug.formparser

    def no_temp_files(*a, **k):
        raise AssertionError("an upload was spooled to disk")
    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_temp_files)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_temp_files)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_temp_files)
    big = image_bytes(photos["astronaut"].resize((1400, 1400)), "PNG")
    assert len(big) > 600_000
    assert post(client, [("big.png", big, None)]).status_code == 200


def test_model_errors_are_json_500_and_the_batcher_survives(app, client, photos, monkeypatch):
    batcher = app.extensions["captioner"]["batcher"]
    real = batcher.captioner.caption_pixels

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(batcher.captioner, "caption_pixels", broken)
    assert_error(post(client, [("c.jpg", image_bytes(photos["cat"]), None)]), 500, "internal_error")
    monkeypatch.setattr(batcher.captioner, "caption_pixels", real)
    assert post(client, [("c.jpg", image_bytes(photos["cat"]), None)]).status_code == 200


def test_concurrent_requests_are_batched(tiny_captioner, photos):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app({"CAPTIONER": tiny_captioner, "BATCH_WAIT_MS": 200, "BATCH_MAX_SIZE": 8})
    data = image_bytes(photos["cat"])

    def one(_):
        return post(app.test_client(), [("c.jpg", data, None)]).status_code
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8
    text = app.test_client().get("/metrics").get_data(as_text=True)
    count = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith("captioner_batch_images_count")))
    assert count < 1 + 8  # warm-up + fewer model calls than requests


def test_grounding_switch_over_http(client, photos):
    data = image_bytes(photos["cat"])
    grounded = post(client, [("c.jpg", data, None)]).get_json()["results"][0]
    plain = post(client, [("c.jpg", data, None)], "?grounding=false").get_json()["results"][0]
    form = client.post("/v1/captions", data={"image": (io.BytesIO(data), "c.jpg"), "grounding": "0"},
                       content_type="multipart/form-data").get_json()["results"][0]
    assert "cat" in grounded["caption"].split() and "cat" not in plain["caption"].split()
    assert form["caption"] == plain["caption"] and plain["objects"] == grounded["objects"]


def test_openapi_options_are_the_libraries(client):
    import dataclasses

    from captioner.options import DecodeOptions

    spec = client.get("/openapi.json").get_json()
    params = {p["name"]: p["schema"] for p in spec["paths"]["/v1/captions"]["post"]["parameters"]}
    assert set(params) == {f.name for f in dataclasses.fields(DecodeOptions)}
    for name, (low, high) in DecodeOptions.LIMITS.items():
        assert (params[name]["minimum"], params[name]["maximum"]) == (low, high)
        assert params[name]["default"] == getattr(DecodeOptions(), name)
    assert params["grounding"] == {"type": "boolean", "default": True}
    result = spec["components"]["schemas"]["Captions"]["properties"]["results"]["items"]
    assert "objects" in result["required"]


class GatedCaptioner:
    """Wraps a Captioner; caption_pixels waits until `gate` is set (a busy or warming model)."""

    def __init__(self, captioner):
        import threading

        self.captioner, self.gate = captioner, threading.Event()
        self.name, self.backend = captioner.name, captioner.backend

    def caption_pixels(self, pixels, options=None):
        self.gate.wait(30)
        return self.captioner.caption_pixels(pixels, options)


def test_ready_only_after_warm_up_while_answering(tiny_captioner):
    gated = GatedCaptioner(tiny_captioner)
    client = create_app({"CAPTIONER": gated}).test_client()  # returns while the warm-up waits
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert client.get("/healthz").status_code == 200
    gated.gate.set()
    assert wait_ready(client).get_json()["status"] == "ready"


def test_saturated_worker_refuses_at_once_with_retry_after(tiny_captioner, photos):
    import threading
    import time

    gated = GatedCaptioner(tiny_captioner)
    gated.gate.set()
    app = create_app({"CAPTIONER": gated, "MAX_QUEUED_IMAGES": 2})
    client, other = app.test_client(), app.test_client()
    wait_ready(client)
    gated.gate.clear()
    jpeg = image_bytes(photos["cat"])
    first = threading.Thread(target=lambda: post(client, [(f"{i}.jpg", jpeg, None) for i in range(2)]))
    first.start()  # two images in the model, which is stuck
    time.sleep(0.3)
    t0 = time.monotonic()
    r = post(other, [("c.jpg", jpeg, None)])
    assert time.monotonic() - t0 < 2  # at once, not after the 30 s request timeout
    assert_error(r, 503, "busy")
    assert r.headers["Retry-After"] == "1"
    gated.gate.set()
    first.join(30)
    assert post(other, [("c.jpg", jpeg, None)]).status_code == 200  # room again


def test_precise_messages_and_allow(client, photos):
    r = client.get("/v1/captions")
    assert_error(r, 405) and r.headers["Allow"] == "OPTIONS, POST"
    r = client.post("/v1/captions", data={"image": "just text"}, content_type="multipart/form-data")
    assert "holds text, not a file" in assert_error(r, 400, "missing_image")
    r = client.post("/v1/captions", data=b"--nope\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nxx",
                    content_type="multipart/form-data; boundary=other")
    assert "could not be parsed" in assert_error(r, 400, "malformed_multipart")
    latin1 = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="caf\xe9.jpg"\r\n'
              b"Content-Type: image/jpeg\r\n\r\n" + image_bytes(photos["cat"]) + b"\r\n--b--\r\n")
    r = client.post("/v1/captions", data=latin1, content_type="multipart/form-data; boundary=b")
    assert "file name in another encoding" in assert_error(r, 400, "malformed_multipart")
    fields = "".join(f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(1001))
    r = client.post("/v1/captions", data=(fields + "--b--\r\n").encode(),
                    content_type="multipart/form-data; boundary=b")
    assert "too many parts" in assert_error(r, 413, "too_large")


def test_big_images_are_shrunk_before_conversion():
    from captioner.images import load_image

    big = Image.new("RGBA", (4000, 3000), (0, 0, 0, 0))
    out = load_image(image_bytes(big, "PNG"))
    assert out.mode == "RGB" and out.size == (667, 500)  # reduced 6x (rounding up): short side still >= 448
    assert out.getpixel((10, 10)) == (255, 255, 255)  # transparency composited on white, as before


def test_request_pixel_budget(tiny_captioner, photos):
    client = create_app({"CAPTIONER": tiny_captioner, "MAX_REQUEST_PIXELS": 500_000}).test_client()
    cat = image_bytes(photos["cat"])  # 451 x 300 = 135,300 pixels
    assert post(client, [(f"{i}.jpg", cat, None) for i in range(3)]).status_code == 200
    r = post(client, [(f"{i}.jpg", cat, None) for i in range(4)])
    assert "limit per request is 500,000" in assert_error(r, 413, "too_many_pixels")


def test_confidence_in_every_result_and_the_openapi_schema(calibrated_checkpoint, client, photos):
    from captioner.inference import Captioner

    spec = client.get("/openapi.json").get_json()
    result = spec["components"]["schemas"]["Captions"]["properties"]["results"]["items"]
    assert "confidence" in result["required"] and result["properties"]["confidence"]["maximum"] == 1
    # The tiny model has no calibration: its results say null.
    body = post(client, [("cat.jpg", image_bytes(photos["cat"]), None)]).get_json()
    assert body["results"][0]["confidence"] is None
    calibrated = create_app({"CAPTIONER": Captioner.from_pretrained(calibrated_checkpoint, device="cpu")})
    files = [("cat.jpg", image_bytes(photos["cat"]), None), ("coffee.png", image_bytes(photos["coffee"], "PNG"), None)]
    response = post(calibrated.test_client(), files)
    assert response.status_code == 200
    assert all(0.0 <= r["confidence"] <= 1.0 for r in response.get_json()["results"])


def test_docs_page_is_offline_and_its_assets_are_served(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "http" not in csp and "unsafe" not in csp
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True))
    assert "/docs/swagger-ui-bundle.js" in refs and "/openapi.json" in refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref  # this server only
        asset = client.get(ref)
        assert asset.status_code == 200 and asset.data, ref
    assert b"/openapi.json" in client.get("/docs/docs.js").data
    assert_error(client.get("/docs/index.html"), 404, "not_found")
    assert_error(client.get("/docs/..%2Fapi.py"), 404)


def _described(node, where, missing):
    """Collect the places in an OpenAPI document where a parameter or schema property has
    no description or no example."""
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            if "$ref" not in prop and "description" not in prop:
                missing.append(f"{where}.{name}: description")
            if "$ref" not in prop and "example" not in prop and prop.get("type") not in ("array", "object"):
                missing.append(f"{where}.{name}: example")
        for p in node.get("parameters", []):
            if "description" not in p or "example" not in p:
                missing.append(f"{where} parameter {p['name']}")
        for key, value in node.items():
            _described(value, f"{where}.{key}", missing)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _described(value, f"{where}[{i}]", missing)
    return missing


def test_openapi_describes_every_parameter_and_field(client):
    import dataclasses

    from captioner.options import DecodeOptions

    spec = client.get("/openapi.json").get_json()
    assert _described(spec, "", []) == []
    post_op = spec["paths"]["/v1/captions"]["post"]
    form = post_op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    params = {p["name"]: p for p in post_op["parameters"]}
    for f in dataclasses.fields(DecodeOptions):  # one text for each option: its help in options.py
        assert f.metadata["help"] and params[f.name]["description"] == f.metadata["help"] == form[f.name]["description"]
        DecodeOptions(**{f.name: params[f.name]["example"]})  # the example is a valid value


def test_model_metadata(app, client, tiny_captioner):
    import captioner
    from server.api import model_info

    r = client.get("/v1/model")
    assert r.status_code == 200
    body = r.get_json()
    config = tiny_captioner.model.config
    assert body["name"] == "tiny-test" and body["version"] == captioner.__version__
    assert body["vocabulary_size"] == len(tiny_captioner.vocab) == config.vocab_size
    assert body["config"] == config.to_dict() and config.encoder in body["architecture"]
    assert body["encoder"] == {"name": config.encoder, "fine_tuned": False, "backend": tiny_captioner.backend}
    # The shipped card names another model: it does not describe this one.
    assert body["license"] is None and body["scores"] == [] and body["training_stages"] == []
    spec = client.get("/openapi.json").get_json()
    assert set(body) == set(spec["components"]["schemas"]["Model"]["required"])
    with app.app_context():
        assert model_info(tiny_captioner, None) == body


def test_model_card_beside_the_checkpoint(tiny_captioner, tmp_path):
    import json

    from server.api import model_info

    weights = tmp_path / "run" / "best.safetensors"
    weights.parent.mkdir()
    card = {"name": "tiny-test", "license": "MIT", "training_data": "two photos",
            "scores": [{"set": "dev", "images": 2, "metrics": {"CIDEr": 0.5}}]}
    (tmp_path / "run" / "best.card.json").write_text(json.dumps(card))
    info = model_info(tiny_captioner, weights)
    assert (info["license"], info["training_data"], info["scores"]) == ("MIT", "two photos", card["scores"])
    (tmp_path / "run" / "best.card.json").write_text(json.dumps({**card, "name": "another-model"}))
    assert model_info(tiny_captioner, weights)["license"] is None


def test_shipped_card_is_the_shipped_model_s_and_matches_the_model_card():
    import json

    from safetensors import safe_open

    from captioner.inference import DEFAULT_WEIGHTS
    from server.api import card_path

    card = json.loads(card_path(None).read_text())
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        assert card["name"] == json.loads(f.metadata()["info"])["name"]
    assert card["license"] and card["training_data"] and len(card["scores"]) == 2
    model_card = (DEFAULT_WEIGHTS.parent / "MODEL_CARD.md").read_text()
    for score in card["scores"]:  # each number is the model card's, in its default (bold) rows
        for metric, value in score["metrics"].items():
            assert f"**{value:.3f}**" in model_card, (score["set"], metric, value)


def test_docs_page_renders_in_chromium_within_its_csp(app, tmp_path):
    """Swagger UI draws every route of the document, and the browser reports nothing
    blocked by the Content-Security-Policy (nor any other error)."""
    import shutil
    import threading
    import time

    from werkzeug.serving import make_server

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromium-driver are not installed (make chromium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/docs")
        operations = sum(len(ops) for ops in app.test_client().get("/openapi.json").get_json()["paths"].values())
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations)
        time.sleep(0.5)  # let late console messages arrive
        problems = [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert problems == []
    finally:
        driver.quit()
        server.shutdown()


def test_attention_maps_over_http(attention_captioner, tiny_captioner, photos):
    client = create_app({"CAPTIONER": attention_captioner}).test_client()
    assert client.get("/v1/model").get_json()["attention"] is True
    files = [("cat.jpg", image_bytes(photos["cat"]), None), ("rocket.png", image_bytes(photos["rocket"], "PNG"), None)]
    for query in ("?attention=true", ""):
        response = post(client, files, query)
        assert response.status_code == 200, response.get_data(as_text=True)
        for r in response.get_json()["results"]:
            if not query:
                assert "attention" not in r
                continue
            assert [a["word"] for a in r["attention"]] == r["caption"].split()
            for a in r["attention"]:
                assert len(a["weights"]) == 7 and all(len(row) == 7 for row in a["weights"])
                assert abs(sum(map(sum, a["weights"])) - 1) < 2e-3
    pooled = create_app({"CAPTIONER": tiny_captioner}).test_client()
    assert pooled.get("/v1/model").get_json()["attention"] is False
    response = post(pooled, files[:1], "?attention=true")
    assert_error(response, 400, "invalid_option")
    assert "attention" in response.get_json()["error"]["message"]
    assert_error(post(client, files[:1], "?attention=maybe"), 400, "invalid_option")
