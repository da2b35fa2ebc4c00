"""The `tuneforge` command."""

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from app.core.adapter_files import AdapterFileError
from app.core.base_models import (
    BaseModelUnavailable,
    UnknownBaseModel,
    available_base_models,
    resolve_base_model,
)
from app.core.db import get_sessionmaker, session_scope
from app.core.migrate import upgrade
from app.core.model_families import UnsupportedBaseModel, describe_base_model
from app.core.settings import EMBEDDED_BASE_MODEL, get_settings
from app.core.storage import open_store
from app.services.adapter_import import import_adapter
from app.services.keys import create_key, get_or_create_tenant, list_keys, revoke_key
from app.services.serving import SERVE_SETTING
from app.services.storage_gc import sweep
from worker.loop import run_worker

app = typer.Typer(
    help="Tuneforge: QLoRA fine-tuning and LoRA serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Tenants' API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
models_app = typer.Typer(help="Served models (LoRA adapters).", no_args_is_help=True)
app.add_typer(models_app, name="models")
storage_app = typer.Typer(help="The artifact store (TUNEFORGE_STORAGE_URL).", no_args_is_help=True)
app.add_typer(storage_app, name="storage")


def _migrated_session():
    """A transaction on an up-to-date database (key commands may run before the first `up`)."""
    upgrade(get_settings().resolved_database_url)
    return session_scope()


@app.command()
def migrate() -> None:
    """Apply the database migrations."""
    upgrade(get_settings().resolved_database_url)
    typer.echo("database is up to date")


@app.command()
def api() -> None:
    """Run the HTTP API and an inference engine for each served base model."""
    settings = get_settings()
    upgrade(settings.resolved_database_url)
    # Each served base is checked as its engine starts; a refused one is logged with why.
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker() -> None:
    """Run one training worker: claims queued jobs, one at a time."""
    run_worker(get_settings())


def _prepare_embedded_base_model() -> None:
    """Materialise the embedded base once, before the API and the worker start, if it is served."""
    settings = get_settings()
    if EMBEDDED_BASE_MODEL in settings.served_base_models:
        if not (settings.base_models_dir / EMBEDDED_BASE_MODEL / "config.json").exists():
            typer.echo(f"preparing base model {EMBEDDED_BASE_MODEL} (first run only: about 30 s)")
        resolve_base_model(EMBEDDED_BASE_MODEL, settings)


@app.command()
def up() -> None:
    """Run the API and one worker until Ctrl-C or SIGTERM, which stops both cleanly."""
    migrate()
    _prepare_embedded_base_model()
    exe = [sys.executable, "-m", "app.cli"]
    children = {
        "api": subprocess.Popen([*exe, "api"]),
        "worker": subprocess.Popen([*exe, "worker"]),
    }
    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    settings = get_settings()
    typer.echo(f"Tuneforge is up on http://{settings.host}:{settings.port} (Ctrl-C stops it)")
    # If either child exits on its own, take the other down too: half a service is no service.
    while not stopping and all(c.poll() is None for c in children.values()):
        time.sleep(0.5)
    asked_to_stop = stopping
    _stop(signal.SIGTERM, None)
    # The worker finishes its current step and writes a checkpoint before exiting.
    deadline = time.monotonic() + 120
    for name, child in children.items():
        try:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            typer.echo(f"{name} did not stop in time; killing it", err=True)
            child.kill()
            child.wait()
    died = [n for n, c in children.items() if c.returncode not in (0, -signal.SIGTERM)]
    if not asked_to_stop:
        typer.echo(f"{' and '.join(died) or 'a child'} exited on its own; stopped the rest", err=True)
    raise typer.Exit(1 if died or not asked_to_stop else 0)


@keys_app.command("create")
def keys_create(tenant: str = typer.Option(..., help="Tenant name; created if new.")) -> None:
    """Create an API key; the key is the last line printed."""
    with _migrated_session() as session:
        row, key = create_key(session, tenant)
        typer.echo(f"created key {row.id} for tenant {tenant} (shown once, store it now):")
    typer.echo(key)


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None, help="Only this tenant's keys.")) -> None:
    """List API keys (their ids and prefixes; keys themselves are never stored)."""
    with _migrated_session() as session:
        for key, t in list_keys(session, tenant):
            state = "revoked" if key.revoked_at else "active"
            typer.echo(f"{key.id}\t{t.name}\t{key.prefix}…\t{state}")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key id shown by 'keys list'.")) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    with _migrated_session() as session:
        if not revoke_key(session, key_id):
            typer.echo(f"no key with id {key_id}; see 'tuneforge keys list'", err=True)
            raise typer.Exit(2)
    typer.echo(f"revoked {key_id}")


@models_app.command("import")
def models_import(
    directory: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory (save_pretrained).")],
    tenant: str = typer.Option(..., help="Tenant that will own the model; created if new."),
    name: str = typer.Option(..., help="Model name: the id becomes ft:<base>:<tenant>:<name>."),
    base: str = typer.Option(
        None,
        help=f"The base model the adapter was trained on (default: the first served one, {SERVE_SETTING}).",
    ),
) -> None:
    """Import an adapter (adapter_config.json + adapter_model.safetensors) and serve it."""
    settings = get_settings()
    base = base or settings.served_base_models[0]
    try:
        with _migrated_session() as session:
            owner = get_or_create_tenant(session, tenant)
            row = import_adapter(
                session,
                open_store(settings),
                owner.id,
                tenant,
                name,
                directory,
                base,
                resolve_base_model(base, settings),
            )
    except (AdapterFileError, OSError) as exc:
        typer.echo(f"cannot import {directory}: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"imported {row.version[:12]} as")
    typer.echo(row.id)


def _parameters(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


@models_app.command("bases")
def models_bases() -> None:
    """Configured base models: family, size, dtype, and whether they train and serve here."""
    settings = get_settings()
    served = settings.served_base_models
    configured = available_base_models(settings)
    typer.echo("name\tfamily\tparameters\tdtype\ttrains\tserves")
    for name in [n for n in served if n not in configured]:
        typer.echo(f"{name}\t-\t-\t-\tno\tno: in {SERVE_SETTING} but not in TUNEFORGE_BASE_MODELS")
    for name in configured:
        try:
            info = describe_base_model(name, resolve_base_model(name, settings))
        except (UnknownBaseModel, BaseModelUnavailable, UnsupportedBaseModel) as exc:
            typer.echo(f"{name}\t-\t-\t-\tno\tno: {exc}")
            continue
        if not info.supported:
            trains = serves = f"no: not a supported family ({info.model_type})"
        else:
            trains = "yes"
            serves = "yes" if name in served else f"no: not in {SERVE_SETTING}"
        fields = [name, info.family, _parameters(info.parameters), info.dtype or "?", trains, serves]
        typer.echo("\t".join(fields))


@storage_app.command("gc")
def storage_gc(
    grace_seconds: float = typer.Option(
        None, help="Keep unreferenced objects younger than this (default TUNEFORGE_STORAGE_GC_GRACE_SECONDS)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
) -> None:
    """Remove stored files, checkpoints and adapters that no database row references, once older
    than the grace period (what crashed publishes and deleted rows left)."""
    settings = get_settings()
    grace = settings.storage_gc_grace_seconds if grace_seconds is None else grace_seconds
    upgrade(settings.resolved_database_url)
    result = sweep(get_sessionmaker(), open_store(settings), grace, dry_run=dry_run)
    for key in result.removed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {key}")
    typer.echo(
        f"{len(result.removed)} objects ({result.removed_bytes} bytes) "
        f"{'to remove' if dry_run else 'removed'}; {result.kept_young} unreferenced but younger "
        f"than {grace:g} s kept"
    )


if __name__ == "__main__":
    app()
