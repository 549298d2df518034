"""The upload floor, and the client library measured: boto3 against obstore.

The floor is what issue 19 defines: the same 1448x1024 frames, encoded with simplejpeg
(q80, 4:2:0) and PUT by the client library as a conditional create (If-None-Match: *)
with an integrity check and the returner's metadata, THREADS threads at once, to
SeaweedFS on loopback (tests/s3support.py), with nothing else: no Redis, no shared
memory, no results store. A variant without the PUT ("encode only") is the baseline that
tells the client's own cost apart.

- `obstore`: `returner.objectstore.ObjectStore.put_new`, exactly as the service
  uploads: obstore's `put(..., mode="create")` (Rust's object_store) with an
  `x-amz-checksum-sha256` (obstore cannot send Content-MD5);
- `boto3`: `put_object` of a boto3 client set up for this job (`boto3_client`:
  Content-MD5, checksums only when required, since R2 refuses boto3's default CRC32, one
  retry, a pool, no `Expect: 100-continue`);
- `boto3 expect`: the same with botocore's default `Expect: 100-continue`, which waits
  for the server's `100 Continue` before sending each body.

Over plain HTTP both clients also sign the payload (x-amz-content-sha256), so each
computes a SHA-256 of every JPEG here; over HTTPS boto3 does not (obstore does).

The variants take turns, ROUNDS times, each on FRAMES frames, so a machine that drifts
(or is shared) treats them alike. Reported per variant, medians over the rounds:
frames/s, and CPU per frame of this process (user + system, from rusage: the encoding
plus the client), of the SeaweedFS process, and of the whole machine (/proc/stat).
Nothing here asserts a speed. Run:

    .venv/bin/pytest benchmarks/test_upload.py --benchmark-only -s -p no:cacheprovider
"""

from __future__ import annotations

import base64
import hashlib
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pytest

from benchmarks import harness
from returner.encode import JpegOptions, encode
from returner.objectstore import CONTENT_TYPE, DEFAULT_CACHE_CONTROL, ObjectStore
from returner.s3config import ObjectStoreConfig, encode_metadata
from tests.s3proxy import FaultProxy
from tests.s3support import REGION, SeaweedS3

pytestmark = pytest.mark.bench

THREADS = 4
FRAMES = 300
ROUNDS = 5
OPTIONS = JpegOptions(quality=80, subsampling="420")
BUCKET = "upload-floor"

Put = Callable[[str, bytes, dict[str, str]], None]


class Figures(NamedTuple):
    rate: float  # frames/s
    client_ms: float  # this process's CPU per frame
    server_ms: float  # SeaweedFS's CPU per frame
    machine_ms: float  # the whole machine's CPU per frame


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    directory = tmp_path_factory.mktemp("upload-floor")
    server = SeaweedS3(directory)
    server.start()
    server.create_bucket(BUCKET)
    yield server
    server.close()
    shutil.rmtree(directory, ignore_errors=True)  # a run leaves about 1 GB of JPEGs


def boto3_client(endpoint: str, expect_continue: bool) -> Any:
    """boto3 as it would have to be set up for this job (credentials from the chain)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION,
        config=Config(
            connect_timeout=3, read_timeout=10, max_pool_connections=16, tcp_keepalive=True,
            retries={"total_max_attempts": 2, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ))  # fmt: skip
    if not expect_continue:
        client.meta.events.register_last("before-call.s3", _no_expect_continue)
    return client


def _no_expect_continue(model: Any, params: dict[str, Any], **_: Any) -> None:
    # Last of the handlers of every S3 call, so after botocore's own that adds it.
    if model.name == "PutObject":
        params["headers"].pop("Expect", None)


def boto3_put(endpoint: str, expect_continue: bool = False) -> tuple[Put, Callable[[], None]]:
    """A conditional create with Content-MD5, the service's headers and metadata."""
    client = boto3_client(endpoint, expect_continue)

    def put(key: str, data: bytes, metadata: dict[str, str]) -> None:
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        client.put_object(Bucket=BUCKET, Key=key, Body=data, IfNoneMatch="*", ContentMD5=md5,
                          ContentType=CONTENT_TYPE, CacheControl=DEFAULT_CACHE_CONTROL,
                          Metadata=encode_metadata(metadata))  # fmt: skip

    return put, client.close


def obstore_put(endpoint: str) -> tuple[Put, Callable[[], None]]:
    """ObjectStore.put_new, as the service uploads (the AWS chain from the environment)."""
    store = ObjectStore(ObjectStoreConfig(
        url=f"s3://{BUCKET}", endpoint_url=endpoint, region=REGION, addressing_style="path",
    ))  # fmt: skip

    def put(key: str, data: bytes, metadata: dict[str, str]) -> None:
        assert store.put_new(key, data, metadata), f"{key} was there already"

    return put, store.close


def encode_only() -> tuple[Put, Callable[[], None]]:
    return (lambda key, data, metadata: None), lambda: None


def cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def upload_round(put: Put, frame: np.ndarray, prefix: str, server: SeaweedS3,
                 count: int = FRAMES) -> Figures:  # fmt: skip
    """Encode and PUT `count` frames on THREADS threads; the figures of that."""
    import psutil

    weed = psutil.Process(server.proc.pid if server.proc else 0)

    def one(i: int) -> None:
        data = encode(frame, "RGB", OPTIONS)
        meta = {"request-id": "bench", "image-id": f"page_{i}", "entry-id": f"{i}-0"}
        put(f"{prefix}/page_{i}_20260101_000000.jpg", data, meta)

    server_cpu, client_cpu = sum(weed.cpu_times()[:2]), cpu_s()
    busy, started = harness.busy_seconds(), time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    per_frame = 1000 / count
    return Figures(
        count / wall,
        (cpu_s() - client_cpu) * per_frame,
        (sum(weed.cpu_times()[:2]) - server_cpu) * per_frame,
        (harness.busy_seconds() - busy) * per_frame,
    )


def integrity_headers(seaweed: SeaweedS3, frame: np.ndarray) -> dict[str, list[str]]:
    """Which integrity headers each client sends, seen through the proxy (a check that
    the variants do what they claim, not a timing)."""
    proxy = FaultProxy(seaweed.port)
    data = encode(frame, "RGB", OPTIONS)
    seen: dict[str, list[str]] = {}
    try:
        for name, make in (("boto3", boto3_put), ("obstore", obstore_put)):
            put, close = make(proxy.endpoint)
            put(f"headers/{name}.jpg", data, {"request-id": "r", "image-id": "i"})
            close()
            headers = proxy.requests("PUT")[-1].headers
            seen[name] = sorted(h for h in headers
                                if h in ("content-md5", "if-none-match", "x-amz-content-sha256")
                                or h.startswith("x-amz-checksum"))  # fmt: skip
    finally:
        proxy.close()
    return seen


@pytest.mark.timeout(900)
def test_upload_floor(benchmark: Any, seaweed: SeaweedS3, page_frame: np.ndarray,
                      monkeypatch: pytest.MonkeyPatch, report: Any) -> None:  # fmt: skip
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    pytest.importorskip("obstore")
    headers = integrity_headers(seaweed, page_frame)
    assert "content-md5" in headers["boto3"] and "if-none-match" in headers["boto3"]
    assert "x-amz-checksum-sha256" in headers["obstore"] and "if-none-match" in headers["obstore"]
    variants: dict[str, Callable[[], tuple[Put, Callable[[], None]]]] = {
        "encode only": encode_only,
        "boto3": lambda: boto3_put(seaweed.endpoint),
        "boto3 expect": lambda: boto3_put(seaweed.endpoint, expect_continue=True),
        "obstore": lambda: obstore_put(seaweed.endpoint),
    }
    clients = {name: make() for name, make in variants.items()}
    figures: dict[str, list[Figures]] = {name: [] for name in variants}

    def run() -> None:
        for name, (put, _) in clients.items():  # warm-up: connections, imports, caches
            upload_round(put, page_frame, f"warmup/{name}", seaweed, count=THREADS * 4)
        for round_ in range(ROUNDS):
            order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
            for name in order:
                put = clients[name][0]
                figures[name].append(upload_round(put, page_frame, f"r{round_}/{name}", seaweed))

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        for _, close in clients.values():
            close()
    medians = {name: Figures(*(statistics.median(f[i] for f in runs) for i in range(4)))
               for name, runs in figures.items()}  # fmt: skip
    base = medians["encode only"]
    for name, m in medians.items():
        extra = {"rounds": [round(f.rate, 1) for f in figures[name]], "threads": THREADS}
        report(f"upload.{name}", m.rate, "frames/s", **extra)
        report(f"upload.{name}.client_cpu", m.client_ms, "ms/frame")
        report(f"upload.{name}.client_cpu_over_encode", m.client_ms - base.client_ms, "ms/frame")
        report(f"upload.{name}.server_cpu", m.server_ms, "ms/frame")
        report(f"upload.{name}.machine_cpu", m.machine_ms, "ms/frame")
    boto, obs = medians["boto3"], medians["obstore"]
    report("upload.obstore/boto3", obs.rate / boto.rate, "x")
    report("upload.obstore/boto3.client_cpu_over_encode",
           (obs.client_ms - base.client_ms) / (boto.client_ms - base.client_ms), "x")  # fmt: skip
    report("upload.boto3 expect/boto3", medians["boto3 expect"].rate / boto.rate, "x")
    report("upload.integrity_headers", 0, "", **headers)
    benchmark.extra_info.update({name: m.rate for name, m in medians.items()})
    assert all(f.rate > 0 for runs in figures.values() for f in runs)
