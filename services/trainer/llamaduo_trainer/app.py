"""The trainer's FastStream app: dataset.ready in, model.trained out."""

from __future__ import annotations

from llamaduo.bus import Binding, run_service
from llamaduo.contract import DatasetReady
from llamaduo.store import open_store
from llamaduo_trainer.settings import TrainerSettings
from llamaduo_trainer.task import TrainingTask


def main() -> None:
    """Console entry point: `llamaduo-trainer`."""
    settings = TrainerSettings()
    run_service(
        "trainer",
        settings,
        lambda: [Binding("trainer", "training", DatasetReady, TrainingTask(settings, open_store(settings)))],
    )


if __name__ == "__main__":
    main()
