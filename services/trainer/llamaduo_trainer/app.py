"""The trainer's FastStream app: dataset.ready in, model.trained out."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_app
from llamaduo.contract import DatasetReady
from llamaduo.store import open_store
from llamaduo.telemetry import configure_logging
from llamaduo_trainer.settings import TrainerSettings
from llamaduo_trainer.task import TrainingTask


def create_app(settings: TrainerSettings | None = None) -> FastStream:
    """The trainer app on its durable consumer."""
    settings = settings or TrainerSettings()
    task = TrainingTask(settings, open_store(settings))
    app, _ = build_app("trainer", settings, [Binding("trainer", "training", DatasetReady, task)])
    return app


def main() -> None:
    """Console entry point: `llamaduo-trainer`."""
    settings = TrainerSettings()
    configure_logging("trainer", settings.log_level)
    run_app(create_app(settings))


if __name__ == "__main__":
    main()
