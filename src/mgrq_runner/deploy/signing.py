"""Keyed signatures of export manifests (``sign_key_env=NAME``).

The manifest's ``digest`` (a SHA-256 over its fields, which hold the SHA-256 of every file of the export) shows
that nothing changed by accident, but whoever rewrites the files can recompute it: it cannot stop a deliberate
forgery. A signature can: ``signature`` is the HMAC-SHA256 of the digest under a secret key that the exporting
and the evaluating side share through an environment variable (the variable's name is the setting; the key itself
never appears in a config, a log or a record). Without the key, no forged export can carry a valid signature.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import Any

from mgrq_runner.errors import ConfigError, ModelError

ALGORITHM = "hmac-sha256"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def signing_key(env_name: str) -> bytes:
    """The key held by environment variable ``env_name``; a missing or empty variable is one ``ConfigError``."""
    if not ENV_NAME.match(env_name):
        raise ConfigError(f"sign_key_env={env_name!r} is not an environment variable name. Fix: e.g. MGRQ_SIGN_KEY.")
    value = os.environ.get(env_name, "")
    if not value:
        raise ConfigError(
            f"sign_key_env={env_name}: the environment variable {env_name} is not set or empty. "
            f"Fix: export {env_name}=<a shared secret, 32+ random characters>, or drop sign_key_env."
        )
    return value.encode()


def signature(digest: str, key: bytes) -> dict[str, str]:
    """The manifest's ``signature`` field for its ``digest``."""
    return {"algorithm": ALGORITHM, "value": hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()}


def check_signature(manifest: dict[str, Any], key: bytes, path: Path) -> None:
    """Refuses a manifest that is unsigned or not signed with ``key`` (its digest already checked)."""
    signed = manifest.get("signature")
    if not isinstance(signed, dict) or signed.get("algorithm") != ALGORITHM:
        raise ModelError(
            f"{path} is not signed, and sign_key_env asks for a signed export. Fix: re-export it with sign_key_env= "
            "set to the same key, or drop sign_key_env to accept unsigned exports."
        )
    expected = signature(str(manifest["digest"]), key)["value"]
    if not hmac.compare_digest(str(signed.get("value", "")), expected):
        raise ModelError(
            f"{path} is not signed with this key (the signature does not match): it was signed with another key, "
            "or forged. Fix: check the key in the environment variable, or re-export the run with it."
        )
