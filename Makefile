# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse
# .venv and install what they need; the system packages (Java for the coco-caption
# scorer, Chromium for the browser test, nginx for the proxy test, exiftool to read back XMP) come from
# Debian through apt-get.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint install java chromium nginx exiftool system-deps bench clean

demo: $(STAMP)
	$(VENV)/bin/captioner caption examples/ --format txt

test: $(STAMP) system-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

system-deps: java chromium nginx exiftool

java:
	@command -v java >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq default-jre-headless >/dev/null; }

chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx-light >/dev/null; }

exiftool:
	@command -v exiftool >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libimage-exiftool-perl >/dev/null; }

bench: $(STAMP)
	$(PY) benchmarks/caption_folder.py
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) *.egg-info
