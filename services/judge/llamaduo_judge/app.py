"""The judge's FastStream app: responses.ready in, evaluation.completed out."""

from __future__ import annotations

from faststream import FastStream

from llamaduo.bus import Binding, build_app, run_app
from llamaduo.contract import ResponsesReady
from llamaduo.store import open_store
from llamaduo.telemetry import configure_logging
from llamaduo_judge.settings import JudgeSettings
from llamaduo_judge.task import JudgingTask


def create_app(settings: JudgeSettings | None = None) -> FastStream:
    """The judge app on its durable consumer."""
    settings = settings or JudgeSettings()
    task = JudgingTask(settings, open_store(settings))
    app, _ = build_app("judge", settings, [Binding("judge", "judging", ResponsesReady, task)])
    return app


def main() -> None:
    """Console entry point: `llamaduo-judge`."""
    settings = JudgeSettings()
    configure_logging("judge", settings.log_level)
    run_app(create_app(settings))


if __name__ == "__main__":
    main()
