"""nginx (Debian's, installed by `make test`) in front of gunicorn, as in docker-compose.yml:
slow clients are held by nginx and never stall the captioning server."""
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import image_bytes
from test_gunicorn import CAPTIONER, free_port, request

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists() and os.environ.get("CI") != "true",
                                reason="nginx is not installed (make test installs it); CI always runs this")

MAIN_CONFIG = """worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/captioner.conf;
}}
"""


def wait_for(url, proc, log, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if request(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.3)
    pytest.fail(f"{url} not ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def proxied(tiny_checkpoint, tmp_path_factory):
    """gunicorn (1 worker, 8 request threads) behind nginx; yields nginx's base URL."""
    tmp = tmp_path_factory.mktemp("nginx")
    app_port, nginx_port = free_port(), free_port()
    template = (ROOT / "server" / "nginx" / "captioner.conf.template").read_text()
    (tmp / "captioner.conf").write_text(template.replace("${CAPTIONER_UPSTREAM}", f"127.0.0.1:{app_port}")
                                        .replace("${NGINX_PORT}", f"127.0.0.1:{nginx_port}"))
    (tmp / "nginx.conf").write_text(MAIN_CONFIG.format(tmp=tmp))
    log = tmp / "server.log"
    procs = []
    try:
        with open(log, "w") as out:
            procs.append(subprocess.Popen([str(CAPTIONER), "serve", "--port", str(app_port), "--workers", "1",
                                           "--weights", str(tiny_checkpoint), "--device", "cpu"],
                                          stdout=out, stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                                          stdout=out, stderr=subprocess.STDOUT))
        wait_for(f"http://127.0.0.1:{nginx_port}/readyz", procs[0], log)
        yield f"http://127.0.0.1:{nginx_port}"
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


def slowloris(port, stop, body=False):
    """A client that sends a request a few bytes at a time and never finishes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = "POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        if body:
            sock.sendall((head + "Content-Length: 100000\r\n\r\n").encode())
        else:
            sock.sendall(head.encode())
        while not stop.wait(0.5):
            try:
                sock.sendall(b"\xff" if body else b"X-Slow: 1\r\n")
            except OSError:
                return


def test_slow_clients_do_not_delay_a_normal_request(proxied, photos):
    port = int(proxied.rsplit(":", 1)[1])
    stop = threading.Event()
    slow = [threading.Thread(target=slowloris, args=(port, stop, i % 2 == 1), daemon=True) for i in range(16)]
    for t in slow:
        t.start()
    try:
        time.sleep(1.5)  # the slow clients hold their connections open
        jpeg = image_bytes(photos["cat"].resize((320, 240)))
        for _ in range(3):
            t0 = time.perf_counter()
            status, body = request(proxied + "/v1/captions", data=jpeg, content_type="image/jpeg")
            elapsed = time.perf_counter() - t0
            print(f"a caption through nginx with 16 slow clients connected: {elapsed:.3f} s")  # pytest -s
            assert status == 200, body
            assert elapsed < 1.0
    finally:
        stop.set()
        for t in slow:
            t.join(5)


def test_nginx_errors_are_json(proxied):
    status, body = request(proxied + "/v1/captions", data=b"\xff" * (11 * 1024 * 1024), content_type="image/jpeg")
    assert status == 413 and b'"too_large"' in body  # urllib sends it all first, and still reads the 413
    status, body = request(proxied + "/" + "x" * 20000)
    assert status in (400, 414) and body.startswith(b'{"error"')
    status, body = request(proxied + "/nothing")
    assert status == 404 and b'"not_found"' in body  # the app's own errors pass through
