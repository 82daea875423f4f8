"""docker-compose.yml and Dockerfile, checked by parsing (no Docker engine runs here)."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, train, nginx = (compose["services"][name] for name in ("server", "train", "nginx"))
    assert "ports" not in server and "8000" in server["expose"]  # not published: nginx is the front
    assert nginx["ports"] == ["8000:8080"] and nginx["environment"]["CAPTIONER_UPSTREAM"] == "server:8000"
    assert nginx["depends_on"]["server"]["condition"] == "service_healthy"
    template = nginx["volumes"][0].split(":")[0]
    assert (ROOT / template).is_file() and "${CAPTIONER_UPSTREAM}" in (ROOT / template).read_text()
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert any(v.endswith(":/app/weights:ro") for v in server["volumes"])
    limits = server["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    assert "profiles" not in server and train["profiles"] == ["train"]
    (gpu,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(v.endswith(":/data:ro") for v in train["volumes"])
    assert train["build"]["target"] == "train" and "command" not in train  # the GPU image's own command
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim AS train" in dockerfile and "--resume" in dockerfile
    stage = dockerfile.split("AS train", 1)[1].split("\nFROM ", 1)[0]
    assert "download.pytorch.org/whl/cpu" not in stage and "--device cuda" in stage
    assert "torchrun --standalone --nproc_per_node ${GPUS} -m captioner train" in stage  # one process per GPU
    assert train["environment"]["GPUS"] == "${GPUS:-1}" and gpu["count"] == "all"


def test_dockerfile_runs_gunicorn_as_non_root_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] != "USER root"
    assert any(line.startswith("HEALTHCHECK") for line in lines) and "/readyz" in text
    assert "COPY weights" in text and "server.wsgi:app" in text and "--preload" not in text
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
