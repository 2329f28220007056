"""A Celery app for Celery's own tools: `celery -A ipab.celery_cli:app inspect active`, Flower.

Built from the settings (IPAB_REDIS_URL, IPAB_REDIS_PREFIX ...) at import, because `celery -A`
imports a module and takes an attribute; nothing else imports this module. It needs no model
set and no torch, so it works from the control-plane image too:

    celery -A ipab.celery_cli:app inspect ping
    celery -A ipab.celery_cli:app inspect active
    celery -A ipab.celery_cli:app flower --port=5555   # pip install flower

Workers answer only with IPAB_CELERY_EVENTS=true (the default).
"""

from __future__ import annotations

from shared.celery_app import make_celery
from shared.settings import load_settings

app = make_celery(load_settings())
