"""Reading, validating and splitting the user's coverage dataset."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from llamaduo.contract.spec import CoverageSpec
from llamaduo.data import ChatRow, DatasetError, parse_jsonl
from llamaduo.store import ArtifactOutsideStore, ArtifactStore, ChecksumMismatch, path_from_file_uri


def read_coverage(store: ArtifactStore, coverage: CoverageSpec, local_dirs: Sequence[Path] = ()) -> list[ChatRow]:
    """Load the coverage JSONL, verify its sha256 if given, validate rows.

    The URI comes from an event, so it is read only from the artifact store (confined to its bucket or root) or,
    for a local path or `file://` URI, from inside one of `local_dirs` (`LLAMADUO_COVERAGE_DIRS`): an event naming
    `file:///etc/passwd` is refused with `artifact_outside_store`, never read.
    """
    if urlparse(coverage.uri).scheme in ("", "file"):
        path = path_from_file_uri(coverage.uri).resolve()
        if any(path.is_relative_to(root.resolve()) for root in local_dirs):
            if not path.is_file():
                raise DatasetError(f"coverage dataset not found: {coverage.uri}")
            data = path.read_bytes()
        else:
            try:
                data = store.read_uri(path.as_uri())
            except ArtifactOutsideStore as exc:
                raise ArtifactOutsideStore(
                    coverage.uri,
                    "a local coverage path is read only from the artifact store or a directory named in "
                    "LLAMADUO_COVERAGE_DIRS; upload it to the store (`llamaduo migrate` does) or allow its directory",
                ) from exc
    else:
        data = store.read_uri(coverage.uri)
    if coverage.sha256 and hashlib.sha256(data).hexdigest() != coverage.sha256:
        raise ChecksumMismatch(coverage.uri, f"coverage sha256 is not the expected {coverage.sha256}")
    return parse_jsonl(data, coverage.uri)


def split_coverage(rows: Sequence[ChatRow], coverage: CoverageSpec) -> tuple[list[ChatRow], list[ChatRow]]:
    """Train and test splits: the user's own `split` fields when every row has one, else a seeded shuffle."""
    if coverage.use_split_field and all(row.split is not None for row in rows):
        train = [row for row in rows if row.split == "train"]
        test = [row for row in rows if row.split == "test"]
        how = "the rows' own split fields"
    else:
        order = list(range(len(rows)))
        random.Random(coverage.split_seed).shuffle(order)
        n_test = max(coverage.min_test_rows, round(len(rows) * coverage.test_fraction))
        n_test = min(n_test, len(rows))
        test = [rows[i] for i in sorted(order[:n_test])]
        train = [rows[i] for i in sorted(order[n_test:])]
        how = f"a test fraction of {coverage.test_fraction}"
    if len(train) < coverage.min_train_rows or len(test) < coverage.min_test_rows:
        raise DatasetError(
            f"too few rows to split: {len(rows)} rows and {how} give {len(train)} train / {len(test)} test; "
            f"at least {coverage.min_train_rows} train and {coverage.min_test_rows} test rows are needed"
        )
    test_prompts = {row.prompt.strip() for row in test}
    leaked = sum(1 for row in train if row.prompt.strip() in test_prompts)
    if leaked:
        train = [row for row in train if row.prompt.strip() not in test_prompts]
    return train, test
