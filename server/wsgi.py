"""gunicorn entry point: `gunicorn -c server/gunicorn.conf.py server.wsgi:app`.

Settings come from the environment, so the same image runs anywhere: each setting in
server/settings.py's SETTINGS is read from CAPTIONER_<NAME> (CAPTIONER_MAX_FILES=4); unset
or empty ones keep their default.
"""
import os

from .app import create_app
from .settings import SETTINGS


def config_from_env(environ=os.environ):
    return {s.name: s.cast(environ[s.env]) for s in SETTINGS if s.cast is not None and environ.get(s.env)}


app = create_app(config_from_env())
