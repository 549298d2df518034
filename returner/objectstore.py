"""The object store (AWS S3, Cloudflare R2, SeaweedFS, MinIO, Ceph RGW): the only module
that talks to it.

Two libraries, the optional extra `returner[s3]`, imported only when an `ObjectStore` is
built (so `import returner` and the core install never load them):

- obstore (Rust's object_store) moves the JPEGs: conditional creates, HEAD, GET, DELETE.
  Measured against boto3 on this job (benchmarks/test_upload.py) it spends about a
  quarter of the CPU per upload and releases the GIL while it waits.
- botocore resolves the credentials (the standard AWS chain: environment, profiles, SSO,
  container and instance roles), the endpoint and the region, and runs the start-up
  check, whose S3 error codes name the setting at fault.

Errors are translated where they enter. At start, `check` turns a missing bucket or
refused credentials into a `SettingsError` naming the setting. Later, every failure of a
request is an `ObjectStoreUnavailable` (transient): the worker pauses and backs off as on
a failing disk and no delivery is spent. That includes a 403 or a 4xx nobody expected,
because what a task contributes to a request is made safe first (a key of safe
characters, metadata percent-encoded and cut to S3's 2 KB), so what is left is the
store's or its configuration's fault, never the task's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from returner.errors import ObjectStoreUnavailable, SettingsError
from returner.s3config import (
    CONTENT_TYPE,
    DEFAULT_CACHE_CONTROL,
    AddressingStyle,
    ObjectInfo,
    ObjectStoreConfig,
    decode_metadata,
    encode_metadata,
    parse_url,
)

if TYPE_CHECKING:
    from obstore.store import S3Credential

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_CACHE_CONTROL",
    "INSTALL",
    "AddressingStyle",
    "ObjectInfo",
    "ObjectStore",
    "ObjectStoreConfig",
    "parse_url",
]

INSTALL = "OBJECT_STORE_URL needs the S3 client libraries: pip install 'returner[s3]'"
# object_store asks for credentials again once fewer than 5 minutes are left, and botocore
# refreshes temporary ones 10-15 minutes before they expire: six minutes means a question
# about once a minute, and never a credential used past its expiry.
CREDENTIALS_TTL = timedelta(minutes=6)
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"})
_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "InvalidRegionName", "PermanentRedirect", "InvalidLocation"}
)


def _shown(url: str | None) -> str:
    """An endpoint for a message: no user info, query or fragment, whatever it held."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _Credentials:
    """obstore's credential provider: botocore's standard chain, refreshed by botocore."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials  # None: the chain found nothing

    def __call__(self) -> S3Credential:
        if self._credentials is None:
            raise LookupError("no AWS credentials found")
        frozen = self._credentials.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + CREDENTIALS_TTL,
        }


def _botocore(config: ObjectStoreConfig) -> tuple[Any, str | None, str, Any]:
    """botocore's session: (check client, configured endpoint, region, credentials).

    Raises SettingsError for a missing library, a bad endpoint, an unknown profile or
    AWS configuration botocore cannot read.
    """
    try:
        import botocore.session
        import obstore  # noqa: F401 (both libraries, or neither)
        from botocore.config import Config
        from botocore.configprovider import ConfiguredEndpointProvider
        from botocore.exceptions import BotoCoreError, ProfileNotFound
    except ImportError:
        raise SettingsError(INSTALL) from None
    session = botocore.session.Session()
    try:
        endpoint = (
            config.endpoint_url
            or ConfiguredEndpointProvider(
                full_config=session.full_config,
                scoped_config=session.get_scoped_config(),
                client_name="s3",
            ).provide()
        )
        region = config.region or session.get_config_variable("region") or "us-east-1"
        credentials = session.get_credentials()
    except ProfileNotFound as exc:
        raise SettingsError(f"AWS_PROFILE: {exc}") from None
    except BotoCoreError as exc:  # a broken ~/.aws/config, a failing credential_process
        raise SettingsError(f"AWS credentials: {type(exc).__name__}: {str(exc)[:200]}") from None
    client_config = Config(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.request_timeout_s,
        retries={"total_max_attempts": config.attempts, "mode": "standard"},
        # boto3 >= 1.36 adds CRC32 checksums by default, which R2 refuses on uploads.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": config.addressing_style},
    )
    try:
        client = session.create_client(
            "s3", endpoint_url=endpoint, region_name=region, config=client_config
        )
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise SettingsError(
            f"S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL): {exc}"
        ) from None
    return client, endpoint, region, credentials


def _obstore(
    config: ObjectStoreConfig, endpoint: str | None, region: str, credentials: _Credentials
) -> Any:
    """obstore's S3Store of the bucket, pooled and thread-safe, with only the checksum
    every store takes on a PUT (SHA-256: R2 refuses boto3's default CRC32 trailer)."""
    from obstore.store import S3Store

    style: AddressingStyle = config.addressing_style
    virtual = style == "virtual" or (style == "auto" and endpoint is None)
    options: dict[str, Any] = {"region": region, "virtual_hosted_style_request": virtual}
    if endpoint:
        parts = urlsplit(endpoint)
        if virtual:  # object_store wants the bucket in a virtual-hosted endpoint
            parts = parts._replace(netloc=f"{config.bucket}.{parts.netloc}")
        options["endpoint"] = urlunsplit(parts)
    connect = timedelta(seconds=config.connect_timeout_s)
    request = timedelta(seconds=config.request_timeout_s)
    return S3Store(
        config.bucket,
        credential_provider=credentials,
        checksum_algorithm="sha256",
        conditional_put="etag",  # If-None-Match: * (whatever AWS_CONDITIONAL_PUT says)
        skip_signature=False,
        client_options={
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": connect,
            "timeout": request,
            "pool_max_idle_per_host": str(config.pool_size),
        },
        retry_config={
            "max_retries": config.attempts - 1,
            "retry_timeout": config.attempts * (connect + request),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=1),
                "base": 2,
            },
        },
        **options,
    )


class ObjectStore:
    """The bucket and prefix of OBJECT_STORE_URL, through one pooled, thread-safe client.

    Raises SettingsError when the client libraries are not installed, the endpoint is
    bad or AWS_PROFILE names no profile.
    """

    def __init__(self, config: ObjectStoreConfig) -> None:
        self.config = config
        self._check_client, endpoint, self.region, credentials = _botocore(config)
        self._credentials = _Credentials(credentials)
        self._store = _obstore(config, endpoint, self.region, self._credentials)
        self._on_aws = endpoint is None
        self.endpoint_url: str = _shown(endpoint)

    def close(self) -> None:
        """Close the start-up check's connections (obstore's close with the store)."""
        self._check_client.close()

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
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        prefix = f"{self.config.prefix}/" if self.config.prefix else ""
        try:
            listed = self._check_client.list_objects_v2(
                Bucket=self.config.bucket, Prefix=prefix, MaxKeys=1
            )
        except NoCredentialsError:
            raise SettingsError(
                "AWS credentials: none found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give the host a role)"
            ) from None
        except ClientError as exc:
            self._refused_at_start(_status(exc), _code(exc))
        except BotoCoreError as exc:
            raise ObjectStoreUnavailable(
                f"object store: list s3://{self.config.bucket}/{prefix} failed: "
                f"could not reach {self.endpoint_url} ({type(exc).__name__})"
            ) from None
        # botocore follows AWS's redirect to a bucket's region; obstore would not.
        actual = listed["ResponseMetadata"]["HTTPHeaders"].get("x-amz-bucket-region")
        if self._on_aws and actual and actual != self.region:
            raise SettingsError(
                f"S3_REGION: bucket {self.config.bucket!r} is in {actual}, not {self.region}"
            )

    def _refused_at_start(self, status: int, code: str) -> NoReturn:
        where = f"s3://{self.config.bucket} at {self.endpoint_url}"
        if status >= 500 or status in (408, 429) or code in _THROTTLED:
            raise ObjectStoreUnavailable(f"object store: list {where} failed: HTTP {status} {code}")
        if code in _REGION_CODES:
            setting = f"S3_REGION: {where} wants another region than {self.region}"
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
        """Create `key` holding the JPEG `data`, unless the key exists (If-None-Match: *),
        with its Content-Type, Cache-Control, metadata and SHA-256 checksum.

        True when created; False when the key was taken (412), by this frame or another:
        compare `head(key)`. Raises ObjectStoreUnavailable.
        """
        import obstore
        from obstore.exceptions import AlreadyExistsError

        attributes: dict[str, str] = {
            "Content-Type": CONTENT_TYPE,
            "Cache-Control": self.config.cache_control,
            **encode_metadata(metadata),
        }
        started = time.monotonic()
        try:
            obstore.put(
                self._store, key, data, mode="create", attributes=attributes, use_multipart=False
            )
        except AlreadyExistsError:
            return False
        except _failures() as exc:
            self._raise_unavailable("PUT", key, exc, started)
        return True

    def head(self, key: str) -> ObjectInfo | None:
        """What the store holds at `key`, or None when nothing. Raises ObjectStoreUnavailable."""
        import obstore

        started = time.monotonic()
        try:
            found = obstore.get(self._store, key, options={"head": True})
        except FileNotFoundError:
            return None
        except _failures() as exc:
            self._raise_unavailable("HEAD", key, exc, started)
        etag = (found.meta.get("e_tag") or "").strip('"')
        attributes = dict(found.attributes)
        content_type = attributes.pop("Content-Type", None)
        cache_control = attributes.pop("Cache-Control", None)
        for standard in ("Content-Disposition", "Content-Encoding", "Content-Language"):
            attributes.pop(standard, None)
        return ObjectInfo(
            key=key,
            size=found.meta["size"],
            etag=etag,
            md5_hex=etag if _MD5_ETAG.fullmatch(etag) else None,
            metadata=decode_metadata({k: str(v) for k, v in attributes.items()}),
            content_type=content_type,
            cache_control=cache_control,
        )

    def get(self, key: str) -> bytes | None:
        """The object's bytes (a console thumbnail), or None when there is none.

        Raises ObjectStoreUnavailable.
        """
        import obstore

        started = time.monotonic()
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except FileNotFoundError:
            return None
        except _failures() as exc:
            self._raise_unavailable("GET", key, exc, started)

    def keys(self, prefix: str) -> list[str]:
        """The keys that start with `prefix` (a string prefix, not a directory), at most
        1000. Raises ObjectStoreUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        started = time.monotonic()
        try:
            listed = self._check_client.list_objects_v2(
                Bucket=self.config.bucket, Prefix=prefix, MaxKeys=1000
            )
        except ClientError as exc:
            raise ObjectStoreUnavailable(
                f"object store: LIST s3://{self.config.bucket}/{prefix} failed: "
                f"HTTP {_status(exc)} {_code(exc)} from {self.endpoint_url}"
            ) from None
        except BotoCoreError as exc:
            self._raise_unavailable("LIST", prefix, exc, started)
        return [str(item["Key"]) for item in listed.get("Contents", [])]

    def delete(self, key: str) -> None:
        """Remove `key` (nothing when it is gone already). Raises ObjectStoreUnavailable."""
        import obstore

        started = time.monotonic()
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            return
        except _failures() as exc:
            self._raise_unavailable("DELETE", key, exc, started)

    def _raise_unavailable(self, action: str, key: str, exc: Exception, started: float) -> NoReturn:
        where = f"s3://{self.config.bucket}/{key}"
        kind, what = self._what(exc, time.monotonic() - started)
        message = f"object store: {action} {where} failed: {what}"
        raise ObjectStoreUnavailable(message, kind) from None

    def _what(self, exc: Exception, took_s: float) -> tuple[str, str]:
        """What happened, as an error kind and in words, from obstore's message: never a
        header or a credential."""
        from obstore.exceptions import UnauthenticatedError

        text = str(exc)
        status, code = _STATUS.search(text), _CODE.search(text)
        if status:
            number, name = status.group(1), code.group(1) if code else ""
            throttled = name in _THROTTLED or number == "429"
            shown = f"HTTP {number} {name}{' (throttled)' if throttled else ''}"
            return ("throttled" if throttled else "refused"), f"{shown} from {self.endpoint_url}"
        if isinstance(exc, UnauthenticatedError):
            return (
                "refused",
                "no usable AWS credentials (the AWS chain found none, or refreshing failed)",
            )
        if took_s >= self.config.request_timeout_s * 0.95:
            return (
                "timeout",
                f"{self.endpoint_url} did not answer in {self.config.request_timeout_s}s",
            )
        return (
            "unreachable",
            f"could not reach {self.endpoint_url} (connection refused, reset or closed)",
        )


def _failures() -> tuple[type[Exception], ...]:
    """What obstore raises for a request that failed: its own errors and OSError's."""
    from obstore.exceptions import BaseError

    return (BaseError, OSError)


def _status(exc: Any) -> int:
    status: int = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status


def _code(exc: Any) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "") or str(_status(exc))
    return code
