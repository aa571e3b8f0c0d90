"""The coordinator's FastStream app: decode, call the lifecycle, publish; and answer status requests."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_app
from llamaduo.contract import (
    DatasetReady,
    EvaluationCompleted,
    MigrationCancel,
    MigrationRequested,
    MigrationResume,
    TaskFailed,
)
from llamaduo.store import open_store
from llamaduo.telemetry import configure_logging
from llamaduo_coordinator.deadlines import DeadlineSweep
from llamaduo_coordinator.lifecycle import Coordinator
from llamaduo_coordinator.settings import CoordinatorSettings
from llamaduo_coordinator.status import StatusService


def bindings(settings: CoordinatorSettings) -> list[Binding]:
    """The coordinator's six inputs, each on its own durable consumer."""
    coordinator = Coordinator(open_store(settings), settings.coverage_dir_paths())
    return [
        Binding("coordinator-requested", "accept", MigrationRequested, coordinator.on_requested, skip_terminal=False),
        Binding("coordinator-dataset", "record", DatasetReady, coordinator.on_dataset, skip_terminal=False),
        Binding("coordinator-evaluated", "decide", EvaluationCompleted, coordinator.on_evaluated, skip_terminal=False),
        Binding("coordinator-task-failed", "fail", TaskFailed, coordinator.on_task_failed, skip_terminal=False),
        Binding("coordinator-cancel", "cancel", MigrationCancel, coordinator.on_cancel, skip_terminal=False),
        Binding("coordinator-resume", "resume", MigrationResume, coordinator.on_resume, skip_terminal=False),
    ]


def create_app(settings: CoordinatorSettings | None = None) -> FastStream:
    """The coordinator app: its durable inputs plus the status endpoint (request/reply on `llamaduo.v1.status`)."""
    settings = settings or CoordinatorSettings()
    app, broker = build_app("coordinator", settings, bindings(settings))
    StatusService(lambda: broker.connection.jetstream()).attach(broker)
    DeadlineSweep(
        Coordinator(open_store(settings), settings.coverage_dir_paths()),
        settings,
        lambda: broker.connection.jetstream(),
    ).attach(app)
    return app


def main() -> None:
    """Console entry point: `llamaduo-coordinator`."""
    settings = CoordinatorSettings()
    configure_logging("coordinator", settings.log_level)  # before anything logs
    run_app(create_app(settings))


if __name__ == "__main__":
    main()
