"""The synthesizer's FastStream app: migration.need_more_data in, dataset.ready out."""

from __future__ import annotations

from llamaduo.bus import Binding, run_service
from llamaduo.contract import NeedMoreData
from llamaduo.store import open_store
from llamaduo_synthesizer.settings import SynthesizerSettings
from llamaduo_synthesizer.task import SynthesisTask


def main() -> None:
    """Console entry point: `llamaduo-synthesizer`."""
    settings = SynthesizerSettings()
    run_service(
        "synthesizer",
        settings,
        lambda: [Binding("synthesizer", "synthesis", NeedMoreData, SynthesisTask(settings, open_store(settings)))],
    )


if __name__ == "__main__":
    main()
