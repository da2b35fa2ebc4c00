"""Adapters from object storage on this machine's disk, for the inference engine, whose loader
reads a local directory (on the data dir backend it reads the adapter's own directory instead).

Each API replica keeps a bounded cache under `<data dir>/adapter_cache/<version>/`: an adapter
version is immutable, so a cached copy never goes stale. A download lands in a temp dir, its
weights must hash to the version (the manifest's sha256) before it is renamed into the cache, and
the least recently used versions are evicted beyond both bounds (entries and bytes). The engine's
loader verifies the manifest's block digests again when it loads the files.
"""

import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from app.core.adapter_files import AdapterFileError, AdapterGone
from app.core.artifacts import WEIGHTS_FILE, remove_stale_temps, sha256_file, temp_sibling
from app.core.storage import MANIFEST, ArtifactMissing, ArtifactStore


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


class AdapterCache:
    def __init__(self, root: Path, max_bytes: int, max_entries: int):
        self.root, self.max_bytes, self.max_entries = root, max_bytes, max_entries
        self._lock = threading.Lock()
        self._downloads: dict[str, threading.Lock] = {}
        # version -> bytes, least recently used first; rebuilt from the disk at start (by mtime).
        self._entries: OrderedDict[str, int] = OrderedDict()
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        cached = [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
        for path in sorted(cached, key=lambda p: p.stat().st_mtime):
            self._entries[path.name] = _dir_bytes(path)
        self._evict(keep=None)  # the bounds may have shrunk since

    def materialize(self, store: ArtifactStore, key: str, version: str) -> Path:
        """A local directory holding the adapter at `key` whose weights are `version`."""
        with self._lock:
            download = self._downloads.setdefault(version, threading.Lock())
        final = self.root / version
        with download:  # one download per version; other versions go on in parallel
            try:
                with self._lock:
                    if version in self._entries and final.is_dir():
                        self._entries.move_to_end(version)
                        os.utime(final)  # the order of use survives a restart
                        return final
                size = self._download(store, key, version, final)
                with self._lock:
                    self._entries[version] = size
                    self._evict(keep=version)
            finally:
                with self._lock:
                    self._downloads.pop(version, None)
        return final

    def _download(self, store: ArtifactStore, key: str, version: str, final: Path) -> int:
        tmp = temp_sibling(final)
        try:
            try:
                store.download_dir(key, tmp)
            except ArtifactMissing:
                raise AdapterGone("the adapter's files are gone (the model was deleted)") from None
            if not (tmp / MANIFEST).is_file() or not (tmp / WEIGHTS_FILE).is_file():
                raise AdapterFileError("the adapter in the artifact store is incomplete")
            if sha256_file(tmp / WEIGHTS_FILE) != version:
                raise AdapterFileError(
                    "adapter_model.safetensors in the artifact store does not match its version sha256"
                )
            shutil.rmtree(final, ignore_errors=True)  # a copy the index had lost track of
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _dir_bytes(final)

    def _evict(self, keep: str | None) -> None:
        total = sum(self._entries.values())
        for version in list(self._entries):
            if len(self._entries) <= self.max_entries and total <= self.max_bytes:
                return
            if version == keep:
                continue
            total -= self._entries.pop(version)
            shutil.rmtree(self.root / version, ignore_errors=True)
