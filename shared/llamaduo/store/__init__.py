"""The artifact store: one interface, a local-directory backend and an S3 backend."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from llamaduo.store.base import (
    ArtifactError,
    ArtifactMissing,
    ArtifactOutsideStore,
    ArtifactStore,
    ChecksumMismatch,
    StoreUnavailable,
    artifact_key,
    check_key,
    sha256_of_file,
)
from llamaduo.store.local import LocalStore, StoreFull, path_from_file_uri
from llamaduo.store.settings import StoreSettings


def open_store(settings: StoreSettings) -> ArtifactStore:
    """The store named by `settings.store_url`."""
    parsed = urlparse(settings.store_url)
    if parsed.scheme == "file":
        # file://./rel keeps a relative root; file:///abs is absolute.
        raw = settings.store_url.removeprefix("file://")
        return LocalStore(Path(raw))
    if parsed.scheme == "s3":
        from minio import Minio

        from llamaduo.store.s3 import S3Store

        client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        if not parsed.netloc:
            raise ValueError(f"LLAMADUO_STORE_URL names no bucket: {settings.store_url!r}")
        store = S3Store(client, parsed.netloc, parsed.path)
        store.ensure_bucket()
        return store
    raise ValueError(f"unsupported LLAMADUO_STORE_URL {settings.store_url!r}: use file:///dir or s3://bucket/prefix")


__all__ = [
    "ArtifactError",
    "ArtifactMissing",
    "ArtifactOutsideStore",
    "ArtifactStore",
    "ChecksumMismatch",
    "LocalStore",
    "StoreFull",
    "StoreSettings",
    "StoreUnavailable",
    "artifact_key",
    "check_key",
    "open_store",
    "path_from_file_uri",
    "sha256_of_file",
]
