"""A trainer replica is killed (SIGKILL) in the middle of training, on a real nats-server with two trainer processes:
the task is redelivered to the other replica, which resumes from the last stored checkpoint instead of starting
over, and exactly one adapter (one model.trained) comes out of the iteration."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from llamaduo.bus import BusSettings, Publisher, provision_bus
from llamaduo.contract import DatasetReady, MigrationSpec, ModelTrained, decode
from llamaduo.data import MANIFEST_MEDIA_TYPE, DatasetManifest, Shard, dump_jsonl, make_row
from llamaduo.embedded.nats_server import NatsServer
from llamaduo.store import LocalStore, artifact_key

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
MIGRATION = "failover-001"
STEPS, EVERY = 12, 3


def start_replica(name: str, nats_url: str, store: LocalStore, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    env = {
        **os.environ,
        "LLAMADUO_NATS_URL": nats_url,
        "LLAMADUO_STORE_URL": store.root.as_uri(),
        "LLAMADUO_DEVICE": "cpu",
        "LLAMADUO_WORK_DIR": str(tmp_path / f"work-{name}"),
        "LLAMADUO_MODEL_CACHE": str(tmp_path / "models"),
        "LLAMADUO_ACK_WAIT_S": "4",
        "LLAMADUO_HEARTBEAT_S": "1",
        "LLAMADUO_RETRY_BASE_DELAY_S": "0.2",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamaduo_trainer"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return process, log


def dataset_event(store: LocalStore, base_model: Path) -> DatasetReady:
    rows = [
        make_row(f"Describe change number {i} in one line.", f"fix: change {i}", origin="coverage") for i in range(40)
    ]
    train_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "train.jsonl"), dump_jsonl(rows))
    test_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "test.jsonl"), dump_jsonl(rows[:4]))
    manifest = DatasetManifest(
        migration_id=MIGRATION, iteration=0, shards=[Shard(ref=train_ref, rows=len(rows), origin="coverage")]
    )
    manifest_ref = store.put_bytes(
        artifact_key(MIGRATION, 0, "dataset", "manifest.json"), manifest.model_dump_json().encode(), MANIFEST_MEDIA_TYPE
    )
    spec = MigrationSpec.model_validate(
        {
            "task": {"name": "commit-message"},
            "coverage": {"uri": "unused"},
            "base_model": {"id": str(base_model)},
            "training": {
                "max_steps": STEPS,
                "batch_size": 2,
                "checkpoint_steps": EVERY,
                "validation_fraction": 0.0,
                "max_length": 64,
            },
        }
    )
    return DatasetReady(
        migration_id=MIGRATION,
        iteration=0,
        spec=spec,
        dataset=manifest_ref,
        test=test_ref,
        train_rows=40,
        synthetic_rows=0,
    )


def checkpoint_step(store: LocalStore) -> int | None:
    path = store.root / artifact_key(MIGRATION, 0, "adapter", "checkpoint.json")
    return int(json.loads(path.read_text())["step"]) if path.is_file() else None


async def trained_events(nats_url: str, wait_s: float) -> list[ModelTrained]:
    connection = await nats.connect(nats_url)
    found: list[ModelTrained] = []
    try:
        sub = await connection.jetstream().subscribe("llamaduo.v1.model.trained", ordered_consumer=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                if found:
                    break  # the stream holds no more after the first one arrived
                continue
            found.append(decode(msg.data, ModelTrained))
    finally:
        await connection.close()
    return found


async def test_a_killed_trainer_resumes_on_another_replica_from_its_checkpoint(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    with NatsServer(tmp_path / "nats") as server:
        await provision_bus(BusSettings(nats_url=server.url, ack_wait_s=4))
        replicas = [start_replica(name, server.url, store, tmp_path) for name in ("a", "b")]
        try:
            connection = await nats.connect(server.url)
            await Publisher(connection.jetstream(), "test", BusSettings(nats_url=server.url)).publish(
                dataset_event(store, smollm2_dir)
            )
            await connection.close()
            # Wait for the first stored checkpoint, then kill whichever replica is training.
            deadline = time.monotonic() + 300
            while (checkpoint_step(store) or 0) < EVERY:
                assert time.monotonic() < deadline, "no checkpoint was stored"
                await asyncio.sleep(0.2)
            killed = next(
                (process, log) for process, log in replicas if "task started" in log.read_text(errors="replace")
            )
            killed_at = checkpoint_step(store)
            killed[0].send_signal(signal.SIGKILL)
            killed[0].wait(timeout=30)
            assert killed_at is not None and killed_at < STEPS, "the kill came in the middle of training"
            events = await trained_events(server.url, wait_s=400)
            survivor_log = next(log for process, log in replicas if process is not killed[0]).read_text()
        finally:
            for process, _ in replicas:
                if process.poll() is None:
                    process.terminate()
                    process.wait(timeout=60)
    assert len(events) == 1, "exactly one adapter for the iteration"
    assert events[0].steps == STEPS
    result = json.loads((store.root / artifact_key(MIGRATION, 0, "adapter", "training.json")).read_text())
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= killed_at
    assert result["steps"] == STEPS
    assert "resuming training from a stored checkpoint" in survivor_log
    assert (store.root / artifact_key(MIGRATION, 0, "adapter", "adapter.tar")).is_file()
