"""The inferencer's FastStream app: model.trained in, responses.ready out."""

from __future__ import annotations

from llamaduo.bus import Binding, run_service
from llamaduo.contract import ModelTrained
from llamaduo.store import open_store
from llamaduo_inferencer.settings import InferencerSettings
from llamaduo_inferencer.task import InferenceTask


def main() -> None:
    """Console entry point: `llamaduo-inferencer`."""
    settings = InferencerSettings()
    run_service(
        "inferencer",
        settings,
        lambda: [Binding("inferencer", "inference", ModelTrained, InferenceTask(settings, open_store(settings)))],
    )


if __name__ == "__main__":
    main()
