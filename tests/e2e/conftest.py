"""Real servers (nats-server, S3 endpoint) for this tier."""

from tests.support.servers import any_store, nats_server, s3_endpoint

__all__ = ["any_store", "nats_server", "s3_endpoint"]
