"""The coordinator's FastStream app: decode, call the lifecycle, publish."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_service
from llamaduo.contract import DatasetReady, EvaluationCompleted, MigrationCancel, MigrationRequested, TaskFailed
from llamaduo.store import open_store
from llamaduo_coordinator.lifecycle import Coordinator
from llamaduo_coordinator.settings import CoordinatorSettings


def bindings(settings: CoordinatorSettings) -> list[Binding]:
    """The coordinator's five inputs, each on its own durable consumer."""
    coordinator = Coordinator(open_store(settings))
    return [
        Binding("coordinator-requested", "accept", MigrationRequested, coordinator.on_requested, skip_terminal=False),
        Binding("coordinator-dataset", "record", DatasetReady, coordinator.on_dataset, skip_terminal=False),
        Binding("coordinator-evaluated", "decide", EvaluationCompleted, coordinator.on_evaluated, skip_terminal=False),
        Binding("coordinator-task-failed", "fail", TaskFailed, coordinator.on_task_failed, skip_terminal=False),
        Binding("coordinator-cancel", "cancel", MigrationCancel, coordinator.on_cancel, skip_terminal=False),
    ]


def create_app(settings: CoordinatorSettings | None = None) -> FastStream:
    """The coordinator app (for embedding and tests)."""
    settings = settings or CoordinatorSettings()
    return build_app("coordinator", settings, bindings(settings))[0]


def main() -> None:
    """Console entry point: `llamaduo-coordinator`."""
    settings = CoordinatorSettings()
    run_service("coordinator", settings, lambda: bindings(settings))


if __name__ == "__main__":
    main()
