"""Real gunicorn on a loopback port under a bounded burst of concurrent, mixed requests."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import image_bytes

CAPTIONER = Path(sys.executable).with_name("captioner")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, data=None, content_type=None, timeout=60):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """`captioner serve` with two workers; always terminated."""
    port = free_port()
    log = tmp_path_factory.mktemp("gunicorn") / "server.log"
    # A long batching window keeps requests in flight long enough for the SIGTERM test.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("metrics")),
           "CAPTIONER_BATCH_WAIT_MS": "400", "CAPTIONER_MAX_CONTENT_LENGTH": str(1024 * 1024)}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(CAPTIONER), "serve", "--port", str(port), "--workers", "2",
                                 "--weights", str(tiny_checkpoint), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if request(base + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        else:
            pytest.fail("server not ready in 120 s:\n" + log.read_text())
        yield base, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_burst_of_mixed_requests(server, photos):
    base, proc, log = server
    good = {name: image_bytes(img.resize((320, 240))) for name, img in photos.items()}
    bad = [b"", b"not an image at all", image_bytes(photos["cat"])[:500]]
    jobs = []
    for i in range(200):
        if i % 4 == 3:
            jobs.append(("bad", bad[i % len(bad)]))
        else:
            jobs.append(("good", list(good.values())[i % len(good)]))

    def send(job):
        kind, data = job
        return kind, *request(base + "/v1/captions?beam_size=2", data, "image/jpeg")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    statuses = [status for _, status, _ in results]
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    good_results = [(s, body) for kind, s, body in results if kind == "good"]
    assert all(s == 200 and b'"caption"' in body for s, body in good_results)
    assert all(s == 400 for kind, s, _ in results if kind == "bad")
    assert request(base + "/readyz")[0] == 200 and proc.poll() is None

    # /metrics adds up both workers.
    text = request(base + "/metrics")[1].decode()
    captioned = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("captioner_images_captioned_total"))
    assert captioned >= len(good_results)
    ok = sum(float(line.split()[-1]) for line in text.splitlines()
             if line.startswith('captioner_http_requests_total{route="/v1/captions",status="200"}'))
    assert ok == len(good_results)


def test_chunked_body_over_the_limit_is_413(server):
    """No Content-Length to refuse up front: the limit must hold while the body streams in."""
    import http.client

    base, proc, log = server
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    try:
        chunks = (b"\xff" * 65536 for _ in range(17))  # 1.06 MB against a 1 MB limit
        conn.request("POST", "/v1/captions", body=chunks, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        assert response.status == 413, response.read()
        assert b'"too_large"' in response.read()
    finally:
        conn.close()
    assert request(base + "/readyz")[0] == 200


def test_413_reaches_a_client_that_sends_the_whole_body_first(server):
    """Like urllib or requests without `Expect: 100-continue`: all 3 MB go out before reading."""
    base, proc, log = server
    host, port = base.removeprefix("http://").split(":")
    body = b"\xff" * (3 * 1024 * 1024)  # 3x the 1 MB limit of this server
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"too_large"' in answer
    status, _ = request(base + "/v1/captions", data=body, content_type="image/jpeg")  # urllib itself
    assert status == 413


def test_sigterm_lets_in_flight_requests_finish(server, photos):
    base, proc, log = server
    data = image_bytes(photos["astronaut"])

    def timed(_):
        status, body = request(base + "/v1/captions?beam_size=5", data, "image/jpeg")
        return status, time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(timed, i) for i in range(4)]
        time.sleep(0.15)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answers = [f.result() for f in futures]
    assert all(status == 200 for status, _ in answers), answers
    assert any(done > signalled for _, done in answers)  # they were still in flight at SIGTERM
    assert proc.wait(timeout=40) == 0


def test_metrics_folder_is_removed_on_shutdown(tiny_checkpoint, tmp_path):
    """Without PROMETHEUS_MULTIPROC_DIR set, the server makes one and removes it when it stops."""
    port = free_port()
    before = set(Path(tempfile.gettempdir()).glob("captioner-metrics-*"))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen([str(CAPTIONER), "serve", "--port", str(port), "--workers", "1", "--weights",
                             str(tiny_checkpoint), "--device", "cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if request(f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        made = set(Path(tempfile.gettempdir()).glob("captioner-metrics-*")) - before
        assert len(made) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not any(p.exists() for p in made)


def test_serve_on_a_busy_port_fails_at_once_with_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        result = subprocess.run([str(CAPTIONER), "serve", "--port", str(port)], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 3 and time.monotonic() - t0 < 30  # no gunicorn start, no retries
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot serve on 127.0.0.1:{port}: Address already in use (is another server using it? "
        "choose another --port)"]
