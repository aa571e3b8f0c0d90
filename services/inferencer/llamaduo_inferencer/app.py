"""The inferencer's FastStream app: model.trained in, responses.ready out."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_app
from llamaduo.contract import ModelTrained
from llamaduo.store import open_store
from llamaduo.telemetry import configure_logging
from llamaduo_inferencer.settings import InferencerSettings
from llamaduo_inferencer.task import InferenceTask


def create_app(settings: InferencerSettings | None = None) -> FastStream:
    """The inferencer app on its durable consumer."""
    settings = settings or InferencerSettings()
    task = InferenceTask(settings, open_store(settings))
    app, _ = build_app("inferencer", settings, [Binding("inferencer", "inference", ModelTrained, task)])
    return app


def main() -> None:
    """Console entry point: `llamaduo-inferencer`."""
    settings = InferencerSettings()
    configure_logging("inferencer", settings.log_level)
    run_app(create_app(settings))


if __name__ == "__main__":
    main()
