"""The artifact store: uploaded files, checkpoints and adapters, on the data dir or on S3-compatible
object storage, behind one interface (TUNEFORGE_STORAGE_URL picks it).

Keys are relative POSIX paths, the same on both backends and the same as the data dir's layout:
`files/<id>.jsonl`, `jobs/<job>/checkpoints/step-<N>/…`, `adapters/<version>/…`. Database rows
hold these keys. A writer fills a local temp dir (`temp_dir`) and publishes it: on the data dir a
rename (atomic), on S3 one upload per file with every `manifest.json` last, so a reader that finds
the manifest finds the rest; in both cases the row that points at the key is committed only after.
"""

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from app.core.artifacts import fsync_dir, publish_dir, remove_stale_temps, temp_sibling
from app.core.settings import Settings

MANIFEST = "manifest.json"
# Top-level prefixes the store owns; everything else in the data dir (base models, the SQLite
# database, the adapter cache) is never listed nor swept.
ARTIFACT_PREFIXES = ("files/", "jobs/", "adapters/")
CHUNK_BYTES = 1 << 20
# Objects above 16 MiB go up and come down in 16 MiB parts, several at once: memory stays bounded
# by parts in flight, never the object.
_TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)


class ArtifactMissing(FileNotFoundError):
    """No object under that key (deleted, or never completely published)."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # seconds since the epoch


def _published_order(root: Path) -> list[Path]:
    """Every file under `root`, manifests last."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [p for p in files if p.name != MANIFEST] + [p for p in files if p.name == MANIFEST]


def _check_key(key: str) -> str:
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"not an artifact key: {key!r}")
    return path.as_posix()


class ArtifactStore(ABC):
    """What both backends share: local temp dirs under `scratch` (the data dir), named like the
    data dir's own temp dirs so that `remove_temps` and the sweep find what a crash left."""

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def temp_dir(self, near: str) -> Path:
        """A fresh local dir for writing what will be published at (or next to) key `near`."""
        return temp_sibling(self.scratch / _check_key(near))

    def remove_temps(self, under: str) -> None:
        remove_stale_temps(self.scratch / _check_key(under))

    @abstractmethod
    def publish_dir(self, tmp: Path, prefix: str, *, replace: bool = False) -> None:
        """Publish the files of `tmp` under `prefix`. Content-addressed prefixes (replace False)
        that already exist hold the same bytes and are kept; replace=True drops what was there."""

    @abstractmethod
    def publish_file(self, tmp_file: Path, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """The object's own path on this machine (data dir backend), else None."""
        return None

    @abstractmethod
    def fetch_file(self, key: str, near: str) -> Path:
        """A local path holding the object: the data dir's own file, or a download into a temp dir
        next to key `near` (the caller removes it with remove_temps)."""

    @abstractmethod
    def fetch_dir(self, prefix: str, near: str) -> Path: ...

    @abstractmethod
    def download_dir(self, prefix: str, dest: Path) -> None:
        """Copy every object under `prefix` into the existing local dir `dest`."""

    @abstractmethod
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def list_objects(self, prefix: str) -> Iterator[StoredObject]: ...


class LocalStore(ArtifactStore):
    """The data dir (the embedded default): the layout and the atomic renames of before."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def publish_dir(self, tmp: Path, prefix: str, *, replace: bool = False) -> None:
        final = self._path(prefix)
        final.parent.mkdir(parents=True, exist_ok=True)
        if replace and final.exists():  # left by an attempt that crashed before its commit
            shutil.rmtree(final)
        if final.exists():
            # The same content: refresh its age, so the sweep's grace period counts from now.
            for path in [final, *final.rglob("*")]:
                os.utime(path)
        publish_dir(tmp, final)

    def publish_file(self, tmp_file: Path, key: str) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_file, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp_file, final)
        fsync_dir(final.parent)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def fetch_file(self, key: str, near: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactMissing(key)
        return path

    def fetch_dir(self, prefix: str, near: str) -> Path:
        path = self._path(prefix)
        if not path.is_dir():
            raise ArtifactMissing(prefix)
        return path

    def download_dir(self, prefix: str, dest: Path) -> None:
        shutil.copytree(self.fetch_dir(prefix, prefix), dest, dirs_exist_ok=True)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise ArtifactMissing(key) from None
        with f:
            yield from iter(lambda: f.read(CHUNK_BYTES), b"")

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._prune_empty_parents(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        shutil.rmtree(path, ignore_errors=True)
        self._prune_empty_parents(path.parent)

    def _prune_empty_parents(self, directory: Path) -> None:
        """Remove now-empty dirs up to (not including) a top-level prefix dir such as files/."""
        while directory.parent != self.root and directory != self.root:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        base = self._path(prefix)
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                yield StoredObject(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime)


@lru_cache
def _s3_client(endpoint_url: str | None):
    # One client per process: boto3 clients are thread-safe; credentials and region come from the
    # standard AWS variables and files. Path-style addressing works with every S3-compatible server.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Store(ArtifactStore):
    """s3://BUCKET/PREFIX: the keys under PREFIX, with local temp dirs in the data dir."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, scratch: Path):
        super().__init__(scratch)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = _s3_client(endpoint_url)

    def _name(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def publish_dir(self, tmp: Path, prefix: str, *, replace: bool = False) -> None:
        # Content-addressed prefixes are uploaded again all the same: identical bytes, and a fresh
        # age for the sweep's grace period (an old copy could be swept while this row commits).
        if replace:
            self.delete_prefix(prefix)
        for path in _published_order(tmp):
            self.publish_file(path, f"{prefix}/{path.relative_to(tmp).as_posix()}")

    def publish_file(self, tmp_file: Path, key: str) -> None:
        self.client.upload_file(str(tmp_file), self.bucket, self._name(key), Config=_TRANSFER)

    def fetch_file(self, key: str, near: str) -> Path:
        dest = self.temp_dir(near) / PurePosixPath(key).name
        try:
            self.client.download_file(self.bucket, self._name(key), str(dest), Config=_TRANSFER)
        except ClientError as exc:
            if _missing(exc):
                raise ArtifactMissing(key) from None
            raise
        return dest

    def fetch_dir(self, prefix: str, near: str) -> Path:
        dest = self.temp_dir(near)
        self.download_dir(prefix, dest)
        return dest

    def download_dir(self, prefix: str, dest: Path) -> None:
        found = False
        for obj in self.list_objects(prefix):
            found = True
            target = dest / obj.key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, self._name(obj.key), str(target), Config=_TRANSFER)
        if not found:
            raise ArtifactMissing(prefix)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise ArtifactMissing(key) from None
            raise
        with body:
            yield from body.iter_chunks(CHUNK_BYTES)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def delete(self, keys: Iterable[str]) -> None:
        names = [self._name(k) for k in keys]
        for start in range(0, len(names), 1000):  # the most one DeleteObjects call takes
            batch = [{"Key": n} for n in names[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_prefix(self, prefix: str) -> None:
        self.delete([obj.key for obj in self.list_objects(prefix)])

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        name = self._name(prefix).rstrip("/") + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name):
            for item in page.get("Contents", []):
                yield StoredObject(self._key(item["Key"]), item["Size"], item["LastModified"].timestamp())


def open_store(settings: Settings) -> ArtifactStore:
    """The store of TUNEFORGE_STORAGE_URL (its scheme checked by Settings)."""
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, settings.s3_endpoint_url, settings.data_dir)
    path = parsed.netloc + parsed.path
    return LocalStore(Path(path) if path else settings.data_dir)
