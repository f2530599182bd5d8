"""What raygan treats as a secret, in one place, and the two ways it keeps secrets out of text.

- ``redact``: the *values* of the credential variables in ``SECRET_ENV`` (AWS keys, MLflow's
  token and password) are masked wherever raygan writes text a user or a log may read: error
  messages (``StorageError`` redacts its own), warnings, summaries, MLflow params and tags.
- ``is_secret_key``: a config *key* whose name says it holds a credential (``SECRET_KEY_PARTS``)
  is never sent to MLflow as a param, whatever its value.

Only ``os`` is imported, so any service module can use this without pulling in pyarrow or MLflow.
"""

from __future__ import annotations

import os

SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)
SECRET_KEY_PARTS = ("secret", "password", "token", "access_key", "credential")


def redact(text: str) -> str:
    """``text`` with the values of the secret variables in ``os.environ`` replaced by ``***``."""
    # Very short values would blank out ordinary words, so they are left alone.
    secrets = [os.environ.get(name, "") for name in SECRET_ENV]
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def is_secret_key(key: str) -> bool:
    """True for a config key named like a credential (case-insensitive, any part of it)."""
    lowered = key.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)
