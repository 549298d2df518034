"""The object store (AWS S3, Cloudflare R2, SeaweedFS, MinIO, Ceph RGW): the only module
that talks to it.

The client library, boto3, is the optional extra `returner[s3]` and is imported only when
an `ObjectStore` is built, so `import returner` and the core install never load it.

Errors are translated where they enter. At start, `check` turns a missing bucket or
refused credentials into a `SettingsError` naming the setting. Later, every failure of a
request is an `ObjectStoreUnavailable` (transient): the worker pauses and backs off as on
a failing disk and no delivery is spent. That includes a 403 or a 4xx nobody expected,
because what a task contributes to a request is made safe first (a key of safe
characters, metadata percent-encoded and cut to S3's 2 KB), so what is left is the
store's or its configuration's fault, never the task's.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import quote, quote_from_bytes, unquote, urlsplit, urlunsplit

from returner.errors import ObjectStoreUnavailable, SettingsError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

AddressingStyle = Literal["auto", "path", "virtual"]
ADDRESSING_STYLES: tuple[AddressingStyle, ...] = ("auto", "path", "virtual")
DEFAULT_CACHE_CONTROL = "public, max-age=31536000, immutable"
CONTENT_TYPE = "image/jpeg"
INSTALL = "OBJECT_STORE_URL needs the S3 client library: pip install 'returner[s3]'"

# S3's rules for new buckets (R2's are a subset: no dots).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
# AWS's "safe characters" for keys: nothing in a prefix needs quoting in a URL or a shell.
_PREFIX_PART = re.compile(r"[A-Za-z0-9!_.*'()-]+")
PREFIX_MAX = 256  # keys are at most 1024 bytes; a relative name takes up to 277
# Header-safe metadata: printable ASCII except space and `%`, which percent-encoding uses.
_META_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
# S3 caps user metadata at 2 KB (keys and values); three values of at most 600 fit.
METADATA_VALUE_MAX = 600
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")


def parse_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` as (bucket, prefix), the prefix without slashes at either end
    ("" for none). Raises ValueError saying what is wrong."""
    if not url.startswith("s3://"):
        raise ValueError("must look like s3://BUCKET or s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    _check_bucket(bucket)
    prefix = prefix.removesuffix("/")
    if len(prefix) > PREFIX_MAX:
        raise ValueError(f"has a prefix longer than {PREFIX_MAX} characters")
    for part in prefix.split("/") if prefix else []:
        if not part:
            raise ValueError("has an empty part in its prefix (//)")
        if part in (".", "..") or not _PREFIX_PART.fullmatch(part):
            raise ValueError(
                f"has a prefix part {part!r}: use letters, digits and !_.*'()- (not . or ..)"
            )
    return bucket, prefix


def _check_bucket(bucket: str) -> None:
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(
            f"has a bucket name {bucket!r}: 3-63 lowercase letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket or _IPV4.fullmatch(bucket):
        raise ValueError(f"has a bucket name {bucket!r} that S3 refuses (.. or an IP address)")


@dataclass(frozen=True)
class ObjectStoreConfig:
    """Where JPEGs go and how the client behaves; built from the settings at the edge.

    Raises ValueError for a bad `url`.
    """

    url: str
    endpoint_url: str | None = None  # None: botocore's AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
    region: str | None = None  # None: the AWS chain's (AWS_REGION, the profile), else us-east-1
    addressing_style: AddressingStyle = "auto"
    cache_control: str = DEFAULT_CACHE_CONTROL
    public_base_url: str | None = None  # without a trailing slash
    pool_size: int = 16  # connections kept; at least the threads that upload at once
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0  # between bytes of an answer, not for the whole request
    # One retry, for a pooled connection the store closed meanwhile; the worker does the
    # real backoff. A stalled store costs at most attempts x (connect + read) plus
    # botocore's backoff between them (under 1 s).
    attempts: int = 2
    bucket: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        bucket, prefix = parse_url(self.url)
        object.__setattr__(self, "bucket", bucket)
        object.__setattr__(self, "prefix", prefix)

    def key_for(self, relative_name: str) -> str:
        """The key of a JPEG whose local file would be OUTPUT_DIR/`relative_name`."""
        if not relative_name or relative_name.startswith("/"):
            raise ValueError(f"not a relative name: {relative_name!r}")
        return f"{self.prefix}/{relative_name}" if self.prefix else relative_name

    def url_for(self, key: str) -> str:
        """`PUBLIC_BASE_URL/KEY` (the key percent-encoded) when set, else `s3://BUCKET/KEY`."""
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key, safe='/')}"
        return f"s3://{self.bucket}/{key}"


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD says about an object; metadata values decoded as `put_new` encoded them."""

    key: str
    size: int
    etag: str  # without quotes
    md5_hex: str | None  # the ETag when it is the body's MD5 (a single PUT, no SSE-KMS/-C)
    metadata: dict[str, str]
    content_type: str | None
    cache_control: str | None


def content_md5(data: bytes) -> str:
    """The Content-MD5 header of `data` (base64 of the digest)."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def encode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Values safe in an HTTP header: UTF-8 percent-encoded outside printable ASCII (and
    space and `%`), cut to METADATA_VALUE_MAX without splitting an escape."""
    encoded = {}
    for name, value in metadata.items():
        text = quote_from_bytes(value.encode("utf-8", "surrogatepass"), safe=_META_SAFE)
        if len(text) > METADATA_VALUE_MAX:
            cut = METADATA_VALUE_MAX
            escape = text.rfind("%", cut - 2, cut)
            text = text[: escape if escape >= 0 else cut]
        encoded[name.lower()] = text
    return encoded


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The inverse of `encode_metadata` (a value it cut stays cut)."""
    return {name: unquote(value, errors="replace") for name, value in metadata.items()}


def _shown(url: str | None) -> str:
    """An endpoint for a message: no user info, query or fragment, whatever it held."""
    if not url:
        return "the default endpoint"
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _boto3_client(config: ObjectStoreConfig) -> S3Client:
    """One thread-safe client with its own session and pool. Raises SettingsError."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SettingsError(INSTALL) from None
    client_config = Config(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        max_pool_connections=config.pool_size,
        tcp_keepalive=True,
        retries={"total_max_attempts": config.attempts, "mode": "standard"},
        # boto3 >= 1.36 adds CRC32 (x-amz-checksum-crc32, x-amz-sdk-checksum-algorithm)
        # to every PutObject by default, which R2 and older stores refuse; Content-MD5,
        # which every S3 store verifies, is sent by put_new instead.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": config.addressing_style},
    )
    try:
        # A session of its own: boto3's default session is shared and not thread-safe.
        client = boto3.session.Session().client(
            "s3", endpoint_url=config.endpoint_url, region_name=config.region, config=client_config
        )
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise SettingsError(
            f"S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL): {exc}"
        ) from None
    # Last of the handlers of every S3 call, so after botocore's own that adds the header.
    client.meta.events.register_last("before-call.s3", _no_expect_continue)
    return client


def _no_expect_continue(model: Any, params: dict[str, Any], **_: Any) -> None:
    """Send a PUT's body at once: botocore asks for `100 Continue` first, a round trip
    per JPEG (and a 1 s wait on a stalled store) that only a refused create would save."""
    if model.name == "PutObject":
        params["headers"].pop("Expect", None)


class ObjectStore:
    """The bucket and prefix of OBJECT_STORE_URL, through one pooled, thread-safe client.

    Raises SettingsError when the client library is not installed or the endpoint is bad.
    """

    def __init__(self, config: ObjectStoreConfig) -> None:
        self.config = config
        self._client = _boto3_client(config)
        self.endpoint_url: str = _shown(self._client.meta.endpoint_url)

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def key_for(self, relative_name: str) -> str:
        """PREFIX/ + `relative_name`: see ObjectStoreConfig.key_for."""
        return self.config.key_for(relative_name)

    def url_for(self, key: str) -> str:
        """The image_url of `key`: see ObjectStoreConfig.url_for."""
        return self.config.url_for(key)

    def check(self) -> None:
        """List one key under the prefix: the bucket exists and takes these credentials.

        Raises SettingsError (one line naming the setting) for a missing bucket or refused
        credentials, ObjectStoreUnavailable for a store that cannot be reached or fails.
        """
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        prefix = f"{self.config.prefix}/" if self.config.prefix else ""
        try:
            self._client.list_objects_v2(Bucket=self.config.bucket, Prefix=prefix, MaxKeys=1)
        except (NoCredentialsError, PartialCredentialsError):
            raise SettingsError(
                "AWS credentials: none found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give the host a role)"
            ) from None
        except ClientError as exc:
            self._refused_at_start(exc)
        except _failures() as exc:
            self._raise_unavailable("list", prefix, exc)

    def _refused_at_start(self, exc: Any) -> NoReturn:
        status, code = _status(exc), _code(exc)
        where = f"s3://{self.config.bucket} at {self.endpoint_url}"
        if status >= 500 or status in (408, 429) or code in _THROTTLED:
            self._raise_unavailable("list", "", exc)
        if code in _REGION_CODES:
            setting = f"S3_REGION: {where} wants another region"
        elif code == "InvalidAccessKeyId":
            setting = f"AWS_ACCESS_KEY_ID: {where} does not know this access key"
        elif code == "SignatureDoesNotMatch":
            setting = f"AWS_SECRET_ACCESS_KEY: {where} refused the signature: wrong secret key"
        elif code in ("NoSuchBucket", "InvalidBucketName") or status == 404:
            setting = f"OBJECT_STORE_URL: no bucket {self.config.bucket!r} at {self.endpoint_url}"
        elif status == 403:
            setting = (
                f"OBJECT_STORE_URL: these credentials may not list {self.config.url} at "
                f"{self.endpoint_url} (see the bucket policy in the object storage docs)"
            )
        else:
            setting = f"OBJECT_STORE_URL: {where} refused the check"
        raise SettingsError(f"{setting} (HTTP {status} {code})")

    def put_new(self, key: str, data: bytes, metadata: Mapping[str, str]) -> bool:
        """Create `key` holding the JPEG `data`, unless the key exists (If-None-Match: *).

        True when created; False when the key was taken (412), by this frame or another:
        compare `head(key).md5_hex`. Raises ObjectStoreUnavailable.
        """
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(
                Bucket=self.config.bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                ContentMD5=content_md5(data),
                ContentType=CONTENT_TYPE,
                CacheControl=self.config.cache_control,
                Metadata=encode_metadata(metadata),
            )
        except ClientError as exc:
            if _status(exc) == 412:
                return False
            self._raise_unavailable("PUT", key, exc)
        except _failures() as exc:
            self._raise_unavailable("PUT", key, exc)
        return True

    def head(self, key: str) -> ObjectInfo | None:
        """What the store holds at `key`, or None when nothing. Raises ObjectStoreUnavailable."""
        from botocore.exceptions import ClientError

        try:
            found = self._client.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            self._raise_unavailable("HEAD", key, exc)
        except _failures() as exc:
            self._raise_unavailable("HEAD", key, exc)
        etag = found.get("ETag", "").strip('"')
        encrypted = found.get("ServerSideEncryption", "").startswith("aws:kms")
        plain = not encrypted and "SSECustomerAlgorithm" not in found
        return ObjectInfo(
            key=key,
            size=found["ContentLength"],
            etag=etag,
            md5_hex=etag if plain and _MD5_ETAG.fullmatch(etag) else None,
            metadata=decode_metadata(found.get("Metadata", {})),
            content_type=found.get("ContentType"),
            cache_control=found.get("CacheControl"),
        )

    def get(self, key: str) -> bytes | None:
        """The object's bytes (a console thumbnail), or None when there is none.

        Raises ObjectStoreUnavailable.
        """
        from botocore.exceptions import ClientError

        try:
            found = self._client.get_object(Bucket=self.config.bucket, Key=key)
            with found["Body"] as body:
                return body.read()
        except ClientError as exc:
            if _code(exc) == "NoSuchKey":
                return None
            self._raise_unavailable("GET", key, exc)
        except _failures() as exc:
            self._raise_unavailable("GET", key, exc)

    def delete(self, key: str) -> None:
        """Remove `key` (nothing when it is gone already). Raises ObjectStoreUnavailable."""
        try:
            self._client.delete_object(Bucket=self.config.bucket, Key=key)
        except _failures() as exc:
            self._raise_unavailable("DELETE", key, exc)

    def _raise_unavailable(self, action: str, key: str, exc: Exception) -> NoReturn:
        where = f"s3://{self.config.bucket}/{key}"
        raise ObjectStoreUnavailable(
            f"object store: {action} {where} failed: {self._what(exc)}"
        ) from None

    def _what(self, exc: Exception) -> str:
        """What happened, in words; never the request's headers or a credential."""
        from botocore import exceptions as bx

        config, endpoint = self.config, self.endpoint_url
        if isinstance(exc, bx.ClientError):
            status, code = _status(exc), _code(exc)
            hint = " (throttled)" if code in _THROTTLED or status == 429 else ""
            return f"HTTP {status} {code}{hint} from {endpoint}"
        known: list[tuple[type[Exception], str]] = [
            (bx.ConnectTimeoutError, f"no connection to {endpoint} in {config.connect_timeout_s}s"),
            (bx.ReadTimeoutError, f"{endpoint} did not answer in {config.read_timeout_s}s"),
            (bx.EndpointConnectionError, f"could not connect to {endpoint}"),
            (bx.ConnectionClosedError, f"{endpoint} closed the connection"),
            (bx.NoCredentialsError, "no AWS credentials found"),
        ]
        for kind, words in known:
            if isinstance(exc, kind):
                return words
        return f"{type(exc).__name__} talking to {endpoint}"


_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"})
_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "InvalidRegionName", "PermanentRedirect", "InvalidLocation"}
)


def _failures() -> tuple[type[Exception], ...]:
    """What botocore raises for a request that failed: an answer, or none."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def _status(exc: Any) -> int:
    status: int = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status


def _code(exc: Any) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "") or str(_status(exc))
    return code
