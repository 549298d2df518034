"""What an object store location is, without a client: OBJECT_STORE_URL's bucket and
prefix, the keys and image URLs of JPEGs, and metadata made safe for HTTP headers.

`returner.objectstore` talks to the store; this module is what the settings, the
records and a console can use without the client library installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, quote_from_bytes, unquote

AddressingStyle = Literal["auto", "path", "virtual"]
DEFAULT_CACHE_CONTROL = "public, max-age=31536000, immutable"
CONTENT_TYPE = "image/jpeg"

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
    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's
    region: str | None = None  # None: the AWS chain's (AWS_REGION, the profile), else us-east-1
    addressing_style: AddressingStyle = "auto"
    cache_control: str = DEFAULT_CACHE_CONTROL
    public_base_url: str | None = None  # without a trailing slash
    pool_size: int = 16  # idle connections kept; at least the threads that upload at once
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 10.0  # a whole request, from connecting to the last byte
    # One retry, for a pooled connection the store closed meanwhile or a 5xx; the worker
    # does the real backoff. A request that times out is not retried, so a stalled store
    # costs request_timeout_s; a failing one attempts x (connect + request) at most.
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

    def key_of(self, url: str) -> str | None:
        """The key of an image_url `url_for` made, or None when it is not one of ours."""
        if url.startswith(f"s3://{self.bucket}/"):
            return url[len(f"s3://{self.bucket}/") :]
        if self.public_base_url and url.startswith(f"{self.public_base_url}/"):
            return unquote(url[len(self.public_base_url) + 1 :])
        return None

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
    # The ETag when it looks like an MD5: the body's for a single PUT, except under AWS's
    # SSE-KMS and SSE-C; the entry-id metadata names the writer whatever the encryption.
    md5_hex: str | None
    metadata: dict[str, str]
    content_type: str | None
    cache_control: str | None


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
