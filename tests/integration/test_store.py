"""One behaviour suite for both artifact stores: the directory store and S3 (moto's real HTTP endpoint)."""

import hashlib
from pathlib import Path

import pytest

from llamaduo.contract import ArtifactRef
from llamaduo.store import ArtifactMissing, ChecksumMismatch, LocalStore, artifact_key
from llamaduo.store.archive import pack_dir, unpack_dir

pytestmark = pytest.mark.integration


def test_put_head_and_verified_read(any_store):
    key = artifact_key("m-001", 0, "dataset", "manifest.json")
    ref = any_store.put_bytes(key, b"hello", "application/json")
    assert ref.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert ref.size == 5
    assert any_store.head(key, "application/json") == ref
    assert any_store.read_bytes(ref) == b"hello"


def test_keys_are_deterministic_per_migration_iteration_and_stage():
    assert artifact_key("m-001", 3, "adapter", "adapter.tar") == "migrations/m-001/iter-0003/adapter/adapter.tar"
    assert artifact_key("m-001", None, "coverage", "test.jsonl") == "migrations/m-001/shared/coverage/test.jsonl"


def test_head_of_a_missing_key_is_none(any_store):
    assert any_store.head("migrations/nothing/here") is None


def test_missing_artifact_is_terminal_and_names_the_uri(any_store):
    ghost = ArtifactRef(uri=any_store.uri_for("migrations/none/x.jsonl"), sha256="0" * 64, size=1)
    with pytest.raises(ArtifactMissing) as info:
        any_store.read_bytes(ghost)
    assert ghost.uri in str(info.value)
    assert info.value.reason == "missing_artifact"


def test_checksum_mismatch_is_terminal_and_names_the_uri(any_store, tmp_path):
    ref = any_store.put_bytes("migrations/m/x.bin", b"real bytes")
    forged = ref.model_copy(update={"sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(ChecksumMismatch) as info:
        any_store.read_bytes(forged)
    assert ref.uri in str(info.value)
    with pytest.raises(ChecksumMismatch):
        any_store.download(forged, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_overwrite_is_atomic_and_download_verifies(any_store, tmp_path):
    key = "migrations/m/iter-0000/adapter/adapter.tar"
    any_store.put_bytes(key, b"a" * 1000)
    ref = any_store.put_bytes(key, b"b" * 2000)
    out = any_store.download(ref, tmp_path / "sub" / "copy.tar")
    assert out.read_bytes() == b"b" * 2000


def test_local_store_never_shows_a_partial_object(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "root")
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * (3 << 20))
    import shutil

    def broken_copy(src, dst, length=0):
        dst.write(src.read(1 << 20))
        raise OSError("disk went away")

    monkeypatch.setattr(shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk went away"):
        store.put_file("migrations/m/big.bin", source)
    assert store.head("migrations/m/big.bin") is None
    assert not list((tmp_path / "root").rglob("*.partial"))


def test_local_store_refuses_keys_that_escape_its_root(tmp_path):
    with pytest.raises(ValueError, match="escapes"):
        LocalStore(tmp_path / "root").put_bytes("../outside", b"x")


def test_adapter_directory_round_trips_through_a_tar(tmp_path, any_store):
    source = tmp_path / "adapter"
    (source / "nested").mkdir(parents=True)
    (source / "adapter_config.json").write_text("{}")
    (source / "nested" / "w.bin").write_bytes(b"\x00\x01")
    ref = any_store.put_file("migrations/m/a.tar", pack_dir(source, tmp_path / "a.tar"))
    restored = unpack_dir(any_store.download(ref, tmp_path / "b.tar"), tmp_path / "restored")
    assert (restored / "nested" / "w.bin").read_bytes() == b"\x00\x01"
    assert pack_dir(source, tmp_path / "c.tar").read_bytes() == Path(tmp_path / "a.tar").read_bytes()
