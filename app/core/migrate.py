"""Run the Alembic migrations shipped in the `migrations` package."""

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from app.core.db import make_engine

# Any constant: on PostgreSQL, concurrent `tuneforge migrate` runs queue behind this lock.
MIGRATION_LOCK_ID = 0x7475_6E65


def alembic_config(url: str) -> Config:
    cfg = Config()
    # Located, not imported: its scripts import app.core and app.models when Alembic runs them.
    cfg.set_main_option("script_location", str(Path(importlib.util.find_spec("migrations").origin).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
            connection.commit()
    finally:
        engine.dispose()
