# Two images (no Docker engine runs on our build machines, so this file is checked by
# tests/test_compose.py for shape, not built there):
#   the default target: the CPU image for the captioning server;
#   `--target train`: CUDA torch wheels for training on NVIDIA GPUs (the compose `train` service).
FROM python:3.11-slim AS train

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The default index serves the CUDA builds of torch (they bring their own CUDA runtime).
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY server ./server
COPY weights ./weights
RUN pip install .
# One process per GPU ($GPUS, default 1; torchrun with one process is a plain run).
# Resumes the run in /runs/train when it holds one, else starts it.
ENV GPUS=1
CMD ["sh", "-c", "torchrun --standalone --nproc_per_node ${GPUS} -m captioner train --data /data --out /runs/train --device cuda $([ -f /runs/train/train_state.pt ] && echo --resume)"]

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# CPU wheels of the pinned torch/torchvision first: the default index serves CUDA builds
# several GB in size, which a CPU server does not need.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY server ./server
RUN pip install .
COPY weights ./weights

RUN useradd --system --uid 10001 --home-dir /app captioner && chown -R captioner /app
USER captioner

# Export the shipped model's encoder to ONNX at build time, so that the `auto` backend
# (ONNX Runtime on a CPU) starts without an export in every new container.
ENV CAPTIONER_CACHE=/app/.cache/captioner
RUN python -c "from captioner.inference import Captioner; Captioner.from_pretrained('/app/weights/model.safetensors', device='cpu', backend='onnx')"

ENV CAPTIONER_BIND=0.0.0.0:8000 CAPTIONER_WORKERS=1 CAPTIONER_WEIGHTS=/app/weights/model.safetensors
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"
CMD ["python", "-m", "gunicorn", "-c", "server/gunicorn.conf.py", "server.wsgi:app"]
