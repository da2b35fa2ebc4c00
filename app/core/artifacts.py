"""The artifact store on the data dir: atomic directory publishing and content hashes."""

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

WEIGHTS_FILE = "adapter_model.safetensors"
# Manifests also record the sha256 of each BLOCK_BYTES block of the weights file, so that a load
# can verify the blocks on several threads (one sha256 over the whole file cannot be split). At
# ~1 GB/s a 1 MiB block takes ~1 ms to hash, far above the tens of microseconds of handing it to a
# thread, and a 50 MB adapter gives 48 blocks, which keep 8 threads evenly busy (4 MiB blocks would
# give 12: two uneven rounds); the digests cost about 70 bytes of manifest per MiB.
BLOCK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file_blocks(path: Path) -> tuple[str, list[str]]:
    """In one read: the file's sha256 and the sha256 of each of its BLOCK_BYTES blocks."""
    digest, blocks = hashlib.sha256(), []
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            digest.update(block)
            blocks.append(hashlib.sha256(block).hexdigest())
    return digest.hexdigest(), blocks


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(final: Path) -> Path:
    """A fresh temp directory next to `final`, on the same filesystem so rename is atomic."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path) -> Path:
    """fsync `tmp` and rename it to `final`. If `final` exists (same content hash), keep it."""
    fsync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(final.parent)
    return final


def remove_stale_temps(parent: Path) -> None:
    """Drop temp dirs that a crashed writer left behind; they are never referenced."""
    if parent.is_dir():
        for p in parent.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def write_manifest(adapter_dir: Path, **fields) -> str:
    """manifest.json of an adapter: the sha256 of its weights file (its version) and of each of
    the file's blocks, which every load verifies. Returns the sha256."""
    sha256, blocks = sha256_file_blocks(adapter_dir / WEIGHTS_FILE)
    manifest = {
        "sha256": sha256,
        "sha256_blocks": {"block_bytes": BLOCK_BYTES, "digests": blocks},
        **fields,
        "created_at": int(time.time()),
    }
    (adapter_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return sha256
