"""returner.objectstore against a real S3 server (SeaweedFS, tests/s3support.py), with
the fault-injecting proxy of tests/s3proxy.py where a fault is needed; and its pure
parts (URLs, keys, metadata, settings) as plain unit tests."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from returner.embedded import free_port
from returner.encode import JpegOptions, encode
from returner.errors import ObjectStoreUnavailable, SettingsError
from returner.objectstore import CREDENTIALS_TTL, INSTALL, ObjectStore
from returner.s3config import (
    METADATA_VALUE_MAX,
    ObjectStoreConfig,
    decode_metadata,
    encode_metadata,
    parse_url,
)
from returner.settings import load_settings, object_store_config
from tests.conftest import random_frame
from tests.s3proxy import FaultProxy
from tests.s3support import ADMIN, READER, SCOPED, SCOPED_BUCKET, Identity, SeaweedS3

CONNECT_S, REQUEST_S, ATTEMPTS = 1.0, 1.0, 2
# The longest a failing request may take: every attempt timing out, the backoff between
# them (under 1 s), and room for a loaded machine. Minutes of retries fail it.
WORST_S = ATTEMPTS * (CONNECT_S + REQUEST_S) + 1.0 + 3.0
META = {"request-id": "req-1", "image-id": "img-1", "entry-id": "1700000000000-0"}


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def jpeg(seed: int = 0) -> bytes:
    options = JpegOptions(quality=80, subsampling="420")
    return encode(random_frame((96, 64, 3), seed), "RGB", options)


def use_identity(monkeypatch: pytest.MonkeyPatch, server: SeaweedS3, identity: Identity) -> None:
    """The AWS chain's environment for `identity` (and nothing of the host's own)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_REGION", "AWS_DEFAULT_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env(identity).items():
        monkeypatch.setenv(name, value)


def store_at(endpoint: str, bucket: str, prefix: str = "img", **options: Any) -> ObjectStore:
    config = ObjectStoreConfig(
        url=f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
        endpoint_url=endpoint, region="us-east-1", addressing_style="path",
        connect_timeout_s=CONNECT_S, request_timeout_s=REQUEST_S, attempts=ATTEMPTS, **options,
    )  # fmt: skip
    return ObjectStore(config)


@pytest.fixture
def as_admin(monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3) -> SeaweedS3:
    use_identity(monkeypatch, s3_server, ADMIN)
    return s3_server


@pytest.fixture
def store(as_admin: SeaweedS3, s3_bucket: str) -> Iterator[ObjectStore]:
    made = store_at(as_admin.endpoint, s3_bucket)
    yield made
    made.close()


@pytest.fixture
def proxy(s3_server: SeaweedS3) -> Iterator[FaultProxy]:
    made = FaultProxy(s3_server.port)
    yield made
    made.close()


@pytest.fixture
def proxied(as_admin: SeaweedS3, s3_bucket: str, proxy: FaultProxy) -> Iterator[ObjectStore]:
    made = store_at(proxy.endpoint, s3_bucket)
    yield made
    made.close()


@pytest.fixture
def own_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """A server of this test's own, to kill or pause without touching the others'."""
    server = SeaweedS3(tmp_path / "seaweedfs")
    server.start()
    use_identity(monkeypatch, server, ADMIN)
    yield server
    server.kill()
    server.remove_sockets()


def timed(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """What `call` raised (None if nothing) and how long it took."""
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


# ---------------------------------------------------------------- URLs, keys, metadata


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://images", ("images", "")),
    ("s3://images/", ("images", "")),
    ("s3://my.bucket-1/translated", ("my.bucket-1", "translated")),
    ("s3://abc/a/b-c/d_e/", ("abc", "a/b-c/d_e")),
])  # fmt: skip
def test_parse_url_takes_a_bucket_and_a_prefix(url: str, expected: tuple[str, str]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(("url", "says"), [
    ("https://images/x", "s3://BUCKET"),
    ("s3://", "bucket name"),
    ("s3://ab", "bucket name"),
    ("s3://Images", "bucket name"),
    ("s3://under_score", "bucket name"),
    ("s3://-images", "bucket name"),
    ("s3://" + "a" * 64, "bucket name"),
    ("s3://a..b", "S3 refuses"),
    ("s3://192.168.1.10", "S3 refuses"),
    ("s3://images//x", "empty part"),
    ("s3://images/a//b", "empty part"),
    ("s3://images/a/../b", "'..'"),
    ("s3://images/a b", "'a b'"),
    ("s3://images/a?b", "'a?b'"),
    ("s3://images/" + "p" * 300, "longer than"),
])  # fmt: skip
def test_parse_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_url(url)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_keys_go_under_the_prefix() -> None:
    config = ObjectStoreConfig(url="s3://images/translated/v1")
    assert config.key_for("a_20260101_000000.jpg") == "translated/v1/a_20260101_000000.jpg"
    assert config.key_for("2026-01-01/a.jpg") == "translated/v1/2026-01-01/a.jpg"
    assert ObjectStoreConfig(url="s3://images").key_for("a.jpg") == "a.jpg"
    with pytest.raises(ValueError):
        config.key_for("/etc/passwd")
    with pytest.raises(ValueError):
        config.key_for("")


def test_image_urls_use_the_public_base_or_the_s3_url() -> None:
    key = "img/p%C3%A9ge 1_20260101_000000.jpg"  # a safe_stem keeps `%XX` in the name
    plain = ObjectStoreConfig(url="s3://images/img")
    assert plain.url_for(key) == f"s3://images/{key}"
    public = ObjectStoreConfig(url="s3://images/img", public_base_url="https://cdn.example.com")
    assert public.url_for(key) == (
        "https://cdn.example.com/img/p%25C3%25A9ge%201_20260101_000000.jpg"
    )
    assert public.url_for("img/a.jpg") == "https://cdn.example.com/img/a.jpg"


def test_metadata_is_header_safe_and_decodes_back() -> None:
    given = {"request-id": "r 1%2F", "image-id": "ページ\u0007/1", "entry-id": "1-0"}
    sent = encode_metadata(given)
    assert all(value.isascii() and value.isprintable() and " " not in value
               for value in sent.values())  # fmt: skip
    assert decode_metadata(sent) == given


def test_long_metadata_is_cut_between_escapes() -> None:
    sent = encode_metadata({"image-id": "é" * 1000, "request-id": "x" * 5000})
    assert len(sent["image-id"]) <= METADATA_VALUE_MAX
    assert len(sent["request-id"]) == METADATA_VALUE_MAX
    assert decode_metadata(sent)["image-id"] == "é" * (len(sent["image-id"]) // 6)
    total = sum(len(k) + len(v) for k, v in sent.items())
    assert total <= 2048  # S3's limit on user metadata


@pytest.mark.parametrize(("endpoint", "style", "expected"), [
    (None, "auto", (None, "true")),  # AWS: virtual-hosted
    ("https://acc.r2.cloudflarestorage.com", "auto", ("https://acc.r2.cloudflarestorage.com",
                                                      "false")),
    ("http://127.0.0.1:8333", "path", ("http://127.0.0.1:8333", "false")),
    ("https://minio.example.com:9000", "virtual", ("https://images.minio.example.com:9000",
                                                   "true")),
])  # fmt: skip
def test_addressing_styles_reach_the_uploads(
    monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3, endpoint: str | None, style: Any,
    expected: tuple[str | None, str],
) -> None:  # fmt: skip
    use_identity(monkeypatch, s3_server, ADMIN)
    made = ObjectStore(ObjectStoreConfig(url="s3://images/x", endpoint_url=endpoint,
                                         addressing_style=style))  # fmt: skip
    uploads = made._store.config  # what obstore was given; nothing is sent here
    assert (uploads.get("endpoint"), uploads["virtual_hosted_style_request"]) == expected
    assert made.endpoint_url == (endpoint or "AWS S3")


def test_uploads_get_the_chains_credentials_for_a_few_minutes(
    monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3
) -> None:
    use_identity(monkeypatch, s3_server, ADMIN)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-session-token")
    made = store_at(s3_server.endpoint, "images")
    given = made._credentials()
    assert (given["access_key_id"], given["secret_access_key"], given["token"]) == (
        ADMIN.access_key, ADMIN.secret_key, "a-session-token"
    )  # fmt: skip
    left = given["expires_at"] - datetime.now(UTC)
    assert timedelta(minutes=5) < left <= CREDENTIALS_TTL  # asked again about once a minute


# ---------------------------------------------------------------- settings


def object_store_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    for name in ("OBJECT_STORE_URL", "S3_ENDPOINT_URL", "S3_REGION", "S3_ADDRESSING_STYLE",
                 "CACHE_CONTROL", "PUBLIC_BASE_URL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


@pytest.mark.parametrize(("name", "value"), [
    ("OBJECT_STORE_URL", "https://bucket/prefix"),
    ("OBJECT_STORE_URL", "s3://Bucket"),
    ("OBJECT_STORE_URL", "s3://bucket//prefix"),
    ("S3_ADDRESSING_STYLE", "dns"),
    ("S3_ENDPOINT_URL", "127.0.0.1:8333"),
    ("S3_ENDPOINT_URL", "http://host:99999"),
    ("S3_REGION", "us east 1"),
    ("PUBLIC_BASE_URL", "cdn.example.com"),
    ("PUBLIC_BASE_URL", "https://cdn.example.com/?x=1"),
    ("CACHE_CONTROL", "max-age=1\nX-Injected: 1"),
])  # fmt: skip
def test_a_bad_object_store_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    with pytest.raises(SettingsError) as caught:
        object_store_settings(monkeypatch, **{name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}: ") and "\n" not in message


def test_an_endpoint_with_a_password_is_masked_in_the_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as caught:
        object_store_settings(monkeypatch, S3_ENDPOINT_URL="https://me:hunter2@r2.example.com")
    assert "hunter2" not in str(caught.value)


def test_object_store_settings_build_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert object_store_config(object_store_settings(monkeypatch)) is None
    assert object_store_config(object_store_settings(monkeypatch, OBJECT_STORE_URL=" ")) is None
    settings = object_store_settings(
        monkeypatch, OBJECT_STORE_URL="s3://images/out/", S3_ENDPOINT_URL="http://127.0.0.1:8333/",
        S3_REGION="AUTO", S3_ADDRESSING_STYLE="Path", PUBLIC_BASE_URL="https://img.example.com/",
    )  # fmt: skip
    config = object_store_config(settings)
    assert config is not None
    assert (config.bucket, config.prefix, config.endpoint_url) == (
        "images", "out", "http://127.0.0.1:8333"
    )  # fmt: skip
    assert (config.region, config.addressing_style) == ("auto", "path")
    assert config.public_base_url == "https://img.example.com"
    assert config.cache_control == "public, max-age=31536000, immutable"


# ---------------------------------------------------------------- the optional extra


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_the_core_never_imports_the_client_libraries() -> None:
    done = run_python(
        "import sys, returner, returner.settings, returner.objectstore, returner.cli\n"
        "libraries = ('boto3', 'botocore', 'obstore')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in libraries))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("library", ["obstore", "botocore"])
def test_without_the_extra_an_object_store_says_what_to_install(library: str) -> None:
    done = run_python(
        "import sys\n"
        f"sys.modules[{library!r}] = None  # as if not installed: importing it raises\n"
        "from returner.errors import SettingsError\n"
        "from returner.objectstore import ObjectStore, ObjectStoreConfig\n"
        "try:\n"
        "    ObjectStore(ObjectStoreConfig(url='s3://images'))\n"
        "except SettingsError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{INSTALL}\n"


# ---------------------------------------------------------------- against SeaweedFS


def test_a_second_conditional_create_is_refused(store: ObjectStore, s3_bucket: str,
                                                as_admin: SeaweedS3) -> None:  # fmt: skip
    key = store.key_for("a_20260101_000000.jpg")
    first, second = jpeg(1), jpeg(2)
    assert store.put_new(key, first, META) is True
    assert store.put_new(key, second, {**META, "entry-id": "2-0"}) is False
    stored = as_admin.admin.get_object(Bucket=s3_bucket, Key=key)
    assert stored["Body"].read() == first
    assert stored["Metadata"]["entry-id"] == META["entry-id"]


@pytest.mark.parametrize("header", ["ContentMD5", "ChecksumSHA256"])
def test_the_server_verifies_the_digest(as_admin: SeaweedS3, s3_bucket: str,
                                        header: str) -> None:  # fmt: skip
    data, other = jpeg(1), jpeg(2)
    digest = hashlib.md5(other) if header == "ContentMD5" else hashlib.sha256(other)
    with pytest.raises(ClientError) as caught:
        as_admin.admin.put_object(Bucket=s3_bucket, Key="img/bad.jpg", Body=data,
                                  **{header: b64(digest.digest())})  # fmt: skip
    assert caught.value.response["Error"]["Code"] == "BadDigest"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    listed = as_admin.admin.list_objects_v2(Bucket=s3_bucket, Prefix="img/")
    assert listed["KeyCount"] == 0


def test_headers_and_metadata_round_trip(store: ObjectStore, as_admin: SeaweedS3,
                                         s3_bucket: str) -> None:  # fmt: skip
    data = jpeg(3)
    meta = {"request-id": "req ü/1", "image-id": "ページ-1", "entry-id": "1700000000000-7"}
    key = store.key_for("p_20260101_000000.jpg")
    assert store.put_new(key, data, meta)
    info = store.head(key)
    assert info is not None
    assert (info.key, info.size, info.md5_hex) == (key, len(data), hashlib.md5(data).hexdigest())
    assert info.etag == info.md5_hex  # SeaweedFS: a single PUT's ETag is its MD5
    assert info.content_type == "image/jpeg"
    assert info.cache_control == "public, max-age=31536000, immutable"
    assert info.metadata == meta
    assert store.get(key) == data
    raw = as_admin.admin.head_object(Bucket=s3_bucket, Key=key)
    assert raw["Metadata"]["image-id"] == "%E3%83%9A%E3%83%BC%E3%82%B8-1"  # what was sent


def test_missing_keys_and_delete(store: ObjectStore) -> None:
    key = store.key_for("gone_20260101_000000.jpg")
    assert store.head(key) is None
    assert store.get(key) is None
    store.delete(key)  # nothing there: nothing to do
    assert store.put_new(key, jpeg(), META)
    store.delete(key)
    assert store.head(key) is None
    assert store.put_new(key, jpeg(), META)  # the key is free again


def test_a_custom_cache_control_is_stored(as_admin: SeaweedS3, s3_bucket: str) -> None:
    made = store_at(as_admin.endpoint, s3_bucket, cache_control="private, max-age=60")
    key = made.key_for("c.jpg")
    assert made.put_new(key, jpeg(), META)
    info = made.head(key)
    assert info is not None and info.cache_control == "private, max-age=60"


def test_only_a_sha256_checksum_is_sent_no_crc32(proxied: ObjectStore,
                                                 proxy: FaultProxy) -> None:  # fmt: skip
    data = jpeg(4)
    assert proxied.put_new(proxied.key_for("h.jpg"), data, META)
    (put,) = proxy.requests("PUT")
    assert put.headers.pop("x-amz-checksum-sha256") == b64(hashlib.sha256(data).digest())
    assert put.headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()  # signed
    assert put.headers["if-none-match"] == "*"
    assert put.headers["content-type"] == "image/jpeg"
    assert put.headers["x-amz-meta-request-id"] == "req-1"
    checksums = [h for h in put.headers
                 if h.startswith("x-amz-checksum-") or h in ("x-amz-sdk-checksum-algorithm",
                                                             "x-amz-trailer")]  # fmt: skip
    assert checksums == []
    assert "aws-chunked" not in put.headers.get("content-encoding", "")
    assert "expect" not in put.headers  # the body goes at once, no 100-continue round trip
    assert "authorization" in put.headers and ADMIN.secret_key not in str(put.headers)
    assert int(put.headers["content-length"]) == len(data)


def test_least_privilege_is_enough_and_confines_writes_to_the_prefix(
    monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3
) -> None:
    s3_server.create_bucket(SCOPED_BUCKET)
    use_identity(monkeypatch, s3_server, SCOPED)
    made = store_at(s3_server.endpoint, SCOPED_BUCKET, prefix="img")
    made.check()
    key, data = made.key_for(f"{uuid.uuid4().hex}_20260101_000000.jpg"), jpeg(9)
    assert made.put_new(key, data, META) is True
    assert made.put_new(key, data, META) is False
    info = made.head(key)
    assert info is not None and info.metadata == META
    assert made.head(made.key_for("missing.jpg")) is None  # a 404, not a 403
    assert made.get(key) == data
    made.delete(key)
    assert made.head(key) is None
    elsewhere = store_at(s3_server.endpoint, SCOPED_BUCKET, prefix="other")
    raised, _ = timed(lambda: elsewhere.put_new(elsewhere.key_for("x.jpg"), data, META))
    assert isinstance(raised, ObjectStoreUnavailable) and "HTTP 403 AccessDenied" in str(raised)


# ---------------------------------------------------------------- start-up check


def test_check_passes_for_a_bucket_with_these_credentials(store: ObjectStore) -> None:
    store.check()


def test_check_stops_on_a_missing_bucket(as_admin: SeaweedS3) -> None:
    made = store_at(as_admin.endpoint, f"missing-{uuid.uuid4().hex[:12]}")
    raised, took = timed(made.check)
    assert isinstance(raised, SettingsError)
    assert str(raised).startswith("OBJECT_STORE_URL: no bucket 'missing-")
    assert "\n" not in str(raised) and took < WORST_S


@pytest.mark.parametrize(("identity", "setting"), [
    (Identity("x", ADMIN.access_key, "not-the-secret-of-it", ()), "AWS_SECRET_ACCESS_KEY: "),
    (Identity("x", "AKIAUNKNOWNTOTHEM001", "some-secret-of-nobody", ()), "AWS_ACCESS_KEY_ID: "),
    (READER, "OBJECT_STORE_URL: these credentials may not list"),
])  # fmt: skip
def test_check_stops_on_refused_credentials_without_the_secret(
    monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3, s3_bucket: str,
    identity: Identity, setting: str,
) -> None:  # fmt: skip
    use_identity(monkeypatch, s3_server, identity)
    made = store_at(s3_server.endpoint, s3_bucket)
    raised, took = timed(made.check)
    assert isinstance(raised, SettingsError), raised
    message = str(raised)
    assert message.startswith(setting) and "\n" not in message and took < WORST_S
    assert identity.secret_key not in message and ADMIN.secret_key not in message


def test_check_stops_without_credentials(monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3,
                                         s3_bucket: str) -> None:  # fmt: skip
    use_identity(monkeypatch, s3_server, ADMIN)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    made = store_at(s3_server.endpoint, s3_bucket)
    raised, took = timed(made.check)
    assert isinstance(raised, SettingsError)
    assert str(raised).startswith("AWS credentials: none found") and took < WORST_S
    raised, _ = timed(lambda: made.put_new(made.key_for("n.jpg"), jpeg(), META))
    assert isinstance(raised, ObjectStoreUnavailable)
    assert "no usable AWS credentials" in str(raised)


def test_an_unknown_profile_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                 s3_server: SeaweedS3) -> None:  # fmt: skip
    use_identity(monkeypatch, s3_server, ADMIN)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(SettingsError) as caught:
        store_at(s3_server.endpoint, "images")
    assert str(caught.value).startswith("AWS_PROFILE: ") and "no-such-profile" in str(caught.value)


def test_an_unreachable_endpoint_is_transient(as_admin: SeaweedS3, s3_bucket: str) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    made = store_at(nobody, s3_bucket)
    raised, took = timed(made.check)
    assert isinstance(raised, ObjectStoreUnavailable)
    assert f"could not reach {nobody}" in str(raised) and took < WORST_S
    raised, _ = timed(lambda: made.put_new(made.key_for("u.jpg"), jpeg(), META))
    assert isinstance(raised, ObjectStoreUnavailable)


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(("mode", "status"), [("slowdown", "HTTP 503 SlowDown (throttled)"),
                                              ("error500", "HTTP 500 InternalError")])  # fmt: skip
def test_throttling_and_5xx_are_transient_and_quick(
    proxied: ObjectStore, proxy: FaultProxy, mode: Any, status: str
) -> None:
    key = proxied.key_for("t.jpg")
    proxy.mode = mode
    raised, took = timed(lambda: proxied.put_new(key, jpeg(), META))
    assert isinstance(raised, ObjectStoreUnavailable)
    assert status in str(raised) and took < WORST_S
    assert len(proxy.requests("PUT")) == ATTEMPTS  # botocore's one retry, no more
    raised, _ = timed(lambda: proxied.head(key))
    assert isinstance(raised, ObjectStoreUnavailable)
    proxy.mode = "pass"
    assert proxied.put_new(key, jpeg(), META) is True


def test_a_dropped_connection_is_transient(proxied: ObjectStore, proxy: FaultProxy) -> None:
    proxy.mode = "drop"
    raised, took = timed(lambda: proxied.put_new(proxied.key_for("d.jpg"), jpeg(), META))
    assert isinstance(raised, ObjectStoreUnavailable) and took < WORST_S
    assert "could not reach" in str(raised)
    proxy.mode = "pass"
    assert proxied.put_new(proxied.key_for("d.jpg"), jpeg(), META) is True


def test_a_stalled_proxy_times_out_within_the_configured_timeout(
    proxied: ObjectStore, proxy: FaultProxy
) -> None:
    proxy.mode = "stall"
    raised, took = timed(lambda: proxied.put_new(proxied.key_for("s.jpg"), jpeg(), META))
    assert isinstance(raised, ObjectStoreUnavailable)
    assert f"did not answer in {REQUEST_S}s" in str(raised) and took < WORST_S
    proxy.mode = "pass"
    assert proxied.put_new(proxied.key_for("s.jpg"), jpeg(), META) is True


def test_an_object_survives_kill_9_of_the_server(own_server: SeaweedS3) -> None:
    bucket = own_server.create_bucket("survivor")
    made = store_at(own_server.endpoint, bucket)
    key, data = made.key_for("k_20260101_000000.jpg"), jpeg(5)
    assert made.put_new(key, data, META)
    own_server.kill()
    raised, _ = timed(lambda: made.head(key))
    assert isinstance(raised, ObjectStoreUnavailable)
    took = own_server.start()
    print(f"restart after kill -9: ready in {took:.2f}s")
    info = made.head(key)
    assert info is not None and info.md5_hex == hashlib.md5(data).hexdigest()
    assert info.metadata == META
    assert made.get(key) == data
    assert made.put_new(key, jpeg(6), META) is False  # still refuses to overwrite


def test_a_paused_server_fails_a_put_within_the_timeout_and_recovers(
    own_server: SeaweedS3,
) -> None:
    bucket = own_server.create_bucket("paused")
    made = store_at(own_server.endpoint, bucket)
    assert made.put_new(made.key_for("before.jpg"), jpeg(1), META)  # a pooled connection
    key, data = made.key_for("during.jpg"), jpeg(7)
    own_server.pause()
    try:
        raised, took = timed(lambda: made.put_new(key, data, META))
    finally:
        own_server.resume()
    assert isinstance(raised, ObjectStoreUnavailable)
    assert f"did not answer in {REQUEST_S}s" in str(raised) and took < WORST_S
    # The kernel had taken the request in; the resumed server may store it after all, so
    # a redelivery must accept its own object: created now, or found with its digest.
    if not made.put_new(key, data, META):
        info = made.head(key)
        assert info is not None and info.md5_hex == hashlib.md5(data).hexdigest()
        print("the PUT that timed out during SIGSTOP was stored after SIGCONT")
    assert made.put_new(made.key_for("after.jpg"), jpeg(8), META) is True
