"""Where artifacts live, read from the environment (`LLAMADUO_STORE_URL`, `LLAMADUO_S3_*`)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    """The artifact store: `file:///path` (default: a local folder) or `s3://bucket/prefix`."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    store_url: str = "file://./.llamaduo/artifacts"
    s3_endpoint: str = "localhost:9000"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = False
    s3_region: str | None = None
