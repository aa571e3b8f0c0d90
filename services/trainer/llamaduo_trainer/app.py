"""The trainer's FastStream app: dataset.ready in, model.trained out."""

from __future__ import annotations

from llamaduo.bus import Binding, run_service
from llamaduo.contract import DatasetReady
from llamaduo.store import open_store
from llamaduo_trainer.settings import TrainerSettings


def main() -> None:
    """Console entry point: `llamaduo-trainer`."""
    settings = TrainerSettings()

    def bindings() -> list[Binding]:
        # Imported once JSON logging is set up: the training stack logs while it loads.
        from llamaduo_trainer.task import TrainingTask

        return [Binding("trainer", "training", DatasetReady, TrainingTask(settings, open_store(settings)))]

    run_service("trainer", settings, bindings)


if __name__ == "__main__":
    main()
