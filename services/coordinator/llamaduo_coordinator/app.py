"""The coordinator's FastStream app: decode, call the lifecycle, publish."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_app
from llamaduo.contract import DatasetReady, EvaluationCompleted, MigrationCancel, MigrationRequested, TaskFailed
from llamaduo.store import open_store
from llamaduo.telemetry import configure_logging
from llamaduo_coordinator.lifecycle import Coordinator
from llamaduo_coordinator.settings import CoordinatorSettings


def create_app(settings: CoordinatorSettings | None = None) -> FastStream:
    """The coordinator app, wired to its five durable consumers."""
    settings = settings or CoordinatorSettings()
    coordinator = Coordinator(open_store(settings))
    bindings = [
        Binding("coordinator-requested", "accept", MigrationRequested, coordinator.on_requested, skip_terminal=False),
        Binding("coordinator-dataset", "record", DatasetReady, coordinator.on_dataset, skip_terminal=False),
        Binding("coordinator-evaluated", "decide", EvaluationCompleted, coordinator.on_evaluated, skip_terminal=False),
        Binding("coordinator-task-failed", "fail", TaskFailed, coordinator.on_task_failed, skip_terminal=False),
        Binding("coordinator-cancel", "cancel", MigrationCancel, coordinator.on_cancel, skip_terminal=False),
    ]
    app, _ = build_app("coordinator", settings, bindings)
    return app


def main() -> None:
    """Console entry point: `llamaduo-coordinator`."""
    settings = CoordinatorSettings()
    configure_logging("coordinator", settings.log_level)
    run_app(create_app(settings))


if __name__ == "__main__":
    main()
