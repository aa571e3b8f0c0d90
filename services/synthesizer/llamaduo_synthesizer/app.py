"""The synthesizer's FastStream app: migration.need_more_data in, dataset.ready out."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_app
from llamaduo.contract import NeedMoreData
from llamaduo.store import open_store
from llamaduo.telemetry import configure_logging
from llamaduo_synthesizer.settings import SynthesizerSettings
from llamaduo_synthesizer.task import SynthesisTask


def create_app(settings: SynthesizerSettings | None = None) -> FastStream:
    """The synthesizer app on its durable consumer."""
    settings = settings or SynthesizerSettings()
    task = SynthesisTask(settings, open_store(settings))
    app, _ = build_app("synthesizer", settings, [Binding("synthesizer", "synthesis", NeedMoreData, task)])
    return app


def main() -> None:
    """Console entry point: `llamaduo-synthesizer`."""
    settings = SynthesizerSettings()
    configure_logging("synthesizer", settings.log_level)
    run_app(create_app(settings))


if __name__ == "__main__":
    main()
