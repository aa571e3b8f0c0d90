"""Datasets: chat rows in JSONL and the manifests that list an iteration's training shards."""

from llamaduo.data.manifest import (
    JSONL_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    DatasetManifest,
    Shard,
    read_manifest,
    read_rows,
    read_training_rows,
)
from llamaduo.data.rows import ChatRow, DatasetError, Message, conversation, dump_jsonl, make_row, parse_jsonl

__all__ = [
    "JSONL_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "ChatRow",
    "DatasetError",
    "DatasetManifest",
    "Message",
    "Shard",
    "conversation",
    "dump_jsonl",
    "make_row",
    "parse_jsonl",
    "read_manifest",
    "read_rows",
    "read_training_rows",
]
