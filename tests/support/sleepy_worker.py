"""A worker process for the kill -9 test: it takes a cancel task and never finishes it."""

import asyncio
import sys

from llamaduo.bus import Binding, BusSettings, build_app
from llamaduo.contract import MigrationCancel
from llamaduo.telemetry import configure_logging


async def never_finish(event, ctx):
    print("TASK-STARTED", flush=True)
    await asyncio.sleep(3600)
    return []


def main() -> None:
    configure_logging("sleepy")
    settings = BusSettings(nats_url=sys.argv[1], ack_wait_s=float(sys.argv[2]), heartbeat_s=0.3)
    app, _ = build_app(
        "coordinator", settings, [Binding("coordinator-cancel", "cancel", MigrationCancel, never_finish, False)]
    )
    asyncio.run(app.run())


if __name__ == "__main__":
    main()
