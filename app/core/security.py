"""API keys: random secrets shown once; only their sha256 is stored."""

import hashlib
import secrets

KEY_PREFIX = "tf-"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:10]
