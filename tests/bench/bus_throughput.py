"""Bus throughput: our task runtime (decode, state check, heartbeat, ack after PubAck) against a bare nats-py
pull consumer with acks, on the same local nats-server in the same run. Prints both rates and the ratio.

    make bench        (or: .venv/bin/python tests/bench/bus_throughput.py --messages 2000)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats

from llamaduo.bus import Binding, BusSettings, Publisher, build_app, provision_bus
from llamaduo.contract import MigrationCancel
from llamaduo.embedded.nats_server import NatsServer

SUBJECT = "llamaduo.v1.migration.cancel"


async def publish_batch(js: object, settings: BusSettings, count: int, tag: str) -> None:
    publisher = Publisher(js, "bench", settings)  # type: ignore[arg-type]
    for start in range(0, count, 200):
        await asyncio.gather(
            *(
                publisher.publish(MigrationCancel(migration_id=f"bench-{tag}-{i:06d}"))
                for i in range(start, min(start + 200, count))
            )
        )


async def ours(settings: BusSettings, count: int) -> float:
    done = asyncio.Event()
    seen = 0

    async def handle(event: MigrationCancel, ctx: object) -> list[object]:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()
        return []

    _, broker = build_app("coordinator", settings, [Binding("coordinator-cancel", "bench", MigrationCancel, handle)])
    nc = await nats.connect(settings.nats_url)
    await publish_batch(nc.jetstream(), settings, count, "ours")
    started = time.perf_counter()
    await broker.start()
    await done.wait()
    elapsed = time.perf_counter() - started
    await broker.stop()
    await nc.close()
    return count / elapsed


async def baseline(settings: BusSettings, count: int) -> float:
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    await publish_batch(js, settings, count, "base")
    sub = await js.pull_subscribe(SUBJECT, durable="bench-baseline", stream="LLAMADUO_EVENTS")
    started = time.perf_counter()
    received = 0
    while received < count:
        for msg in await sub.fetch(1, timeout=5):
            MigrationCancel.model_validate_json(msg.data)
            await msg.ack_sync()
            received += 1
    elapsed = time.perf_counter() - started
    await nc.close()
    return count / elapsed


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        settings = BusSettings(nats_url=server.url)
        await provision_bus(settings)
        base = await baseline(settings, count)
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        settings = BusSettings(nats_url=server.url)
        await provision_bus(settings)
        rate = await ours(settings, count)
    print(f"baseline (nats-py pull, fetch 1, validate, ack_sync): {base:8.0f} msg/s")
    print(f"llamaduo task runtime (decode, state check, ack_sync):   {rate:8.0f} msg/s")
    print(f"ratio ours/baseline: {rate / base:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    asyncio.run(main(parser.parse_args().messages))
