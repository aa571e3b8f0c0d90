"""Claim-check references: large things live in the artifact store, events carry these."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

SHA256_PATTERN = r"^[0-9a-f]{64}$"
MIGRATION_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"
_MIGRATION_ID = re.compile(MIGRATION_ID_PATTERN)


def is_valid_migration_id(value: str) -> bool:
    """Whether `value` is usable as a migration id (it becomes part of keys and subjects)."""
    return bool(_MIGRATION_ID.match(value))


class ArtifactRef(BaseModel):
    """A reference to an immutable object in the artifact store; readers verify `sha256`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(description="Where the object lives: file:///abs/path or s3://bucket/key.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="Hex SHA-256 of the object's bytes.")
    size: int = Field(ge=0, description="Size in bytes.")
    media_type: str = Field(default="application/octet-stream", description="IANA media type of the object.")
