"""The S3 store through the `minio` client: MinIO, AWS S3, or any S3-compatible endpoint."""

from __future__ import annotations

import functools
import io
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from llamaduo.contract.artifacts import ArtifactRef
from llamaduo.store.base import (
    ArtifactMissing,
    ArtifactOutsideStore,
    ArtifactStore,
    StoreUnavailable,
    check_key,
    sha256_of_file,
    sha256_of_stream,
    verify,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
SHA256_META = "sha256"


def _retrying(attempts: int, base_delay: float) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry connection failures and 5xx answers with jittered exponential backoff."""

    def wrap(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def inner(*args: object, **kwargs: object) -> T:
            for attempt in range(attempts):
                try:
                    return func(*args, **kwargs)
                except S3Error as exc:
                    if exc.code in _MISSING_CODES or not (exc.code or "").startswith(("Internal", "Slow", "Service")):
                        raise
                    error: Exception = exc
                except (Urllib3Error, OSError) as exc:
                    error = exc
                if attempt + 1 < attempts:
                    delay = base_delay * 2**attempt * (0.5 + random.random())
                    log.warning(
                        "S3 request failed; retrying",
                        extra={"operation": func.__name__, "attempt": attempt + 1, "error": repr(error)[:300]},
                    )
                    time.sleep(delay)
            raise StoreUnavailable(f"S3 store unreachable after {attempts} attempts: {error}") from error

        return inner

    return wrap


class S3Store(ArtifactStore):
    """Objects in one bucket under a prefix; an object is visible only once its upload completed."""

    def __init__(self, client: Minio, bucket: str, prefix: str = "", *, attempts: int = 5) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        retry = _retrying(attempts, 0.2)
        self._put = retry(self.client.fput_object)
        self._stat = retry(self.client.stat_object)
        self._get = retry(self._get_all)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist."""
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def put_file(self, key: str, path: Path, media_type: str = "application/octet-stream") -> ArtifactRef:
        sha = sha256_of_file(path)
        self._put(self.bucket, self._key(key), str(path), content_type=media_type, metadata={SHA256_META: sha})
        return ArtifactRef(uri=self.uri_for(key), sha256=sha, size=path.stat().st_size, media_type=media_type)

    def head(self, key: str, media_type: str = "application/octet-stream") -> ArtifactRef | None:
        try:
            stat = self._stat(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise
        metadata = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        sha = metadata.get(f"x-amz-meta-{SHA256_META}")
        if sha is None:
            sha, _ = sha256_of_stream(io.BytesIO(self._get(self.bucket, self._key(key))))
        return ArtifactRef(uri=self.uri_for(key), sha256=str(sha), size=int(stat.size or 0), media_type=media_type)

    def _get_all(self, bucket: str, key: str) -> bytes:
        response = self.client.get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def _locate(self, uri: str) -> tuple[str, str]:
        """Bucket and object key of an `s3://` URI from an event, refused unless inside this store's bucket/prefix."""
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ArtifactOutsideStore(uri, f"not an s3:// URI of this store ({where})")
        if parsed.netloc != self.bucket:
            raise ArtifactOutsideStore(uri, f"URI names bucket {parsed.netloc!r}, not this store's ({where})")
        if parsed.query or parsed.fragment or parsed.params:
            raise ArtifactOutsideStore(uri, f"URI carries a query or fragment; refused ({where})")
        key = parsed.path.removeprefix("/")
        relative = key.removeprefix(f"{self.prefix}/") if self.prefix else key
        if self.prefix and relative == key:
            raise ArtifactOutsideStore(uri, f"URI lies outside this store's prefix ({where})")
        try:
            check_key(relative)
        except ArtifactOutsideStore as exc:
            raise ArtifactOutsideStore(uri, f"URI escapes this store ({where})") from exc
        return parsed.netloc, key

    def read_uri(self, uri: str) -> bytes:
        bucket, key = self._locate(uri)
        try:
            return self._get(bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ArtifactMissing(uri, "artifact does not exist") from exc
            raise

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.with_name(f".{dest.name}.partial")
        temp.write_bytes(self.read_uri(ref.uri))
        try:
            verify(ref, sha256_of_file(temp))
        except Exception:
            temp.unlink(missing_ok=True)
            raise
        temp.replace(dest)
        return dest
