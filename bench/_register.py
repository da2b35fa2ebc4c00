"""Registers a benchmark's adapters in one process, through the service code that
`tuneforge models import` and `tuneforge keys create` call: a process per adapter (what the CLI
would take) costs seconds each, too long for 1,000 adapters.

Run by bench/serve.py with the data dir's TUNEFORGE_* environment; reads {"tenant", "base",
"adapters": {name: directory}} as JSON on stdin and prints {"key", "models": [model id, ...]}."""

import json
import sys
from pathlib import Path

from app.core.base_models import resolve_base_model
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import get_settings
from app.core.storage import open_store
from app.services.adapter_import import import_adapter
from app.services.keys import create_key, get_or_create_tenant


def main():
    job = json.load(sys.stdin)
    tenant, base = job["tenant"], job["base"]
    settings = get_settings()
    upgrade(settings.resolved_database_url)
    base_dir = resolve_base_model(base, settings)
    store = open_store(settings)
    with session_scope() as session:
        owner = get_or_create_tenant(session, tenant)
        _, key = create_key(session, tenant)
        models = [
            import_adapter(session, store, owner.id, tenant, name, Path(path), base, base_dir).id
            for name, path in job["adapters"].items()
        ]
    json.dump({"key": key, "models": models}, sys.stdout)


if __name__ == "__main__":
    main()
