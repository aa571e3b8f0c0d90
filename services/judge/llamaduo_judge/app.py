"""The judge's FastStream app: responses.ready in, evaluation.completed out."""

from __future__ import annotations

from llamaduo.bus import Binding, run_service
from llamaduo.contract import ResponsesReady
from llamaduo.store import open_store
from llamaduo_judge.settings import JudgeSettings
from llamaduo_judge.task import JudgingTask


def main() -> None:
    """Console entry point: `llamaduo-judge`."""
    settings = JudgeSettings()
    run_service(
        "judge",
        settings,
        lambda: [Binding("judge", "judging", ResponsesReady, JudgingTask(settings, open_store(settings)))],
    )


if __name__ == "__main__":
    main()
