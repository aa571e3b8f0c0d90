"""What the chaos suite did, collected while it runs and printed as one table when the session ends.

Every number comes from what a test observed (the stream, the store, the scripted service LLM's request log, the
migration state in KV), never from what it meant to do.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ScenarioTally:
    """One scenario's outcome."""

    name: str
    faults: Counter[str] = field(default_factory=Counter)
    migrations_started: int = 0
    migrations_completed: int = 0
    events_lost: int = 0
    work_done_twice: int = 0
    poison_sent: int = 0
    poison_dead_lettered: int = 0
    poison_reasons: Counter[str] = field(default_factory=Counter)
    passed: bool | None = None

    def fault(self, kind: str, count: int = 1) -> None:
        """Count `count` injected faults of `kind`."""
        if count:
            self.faults[kind] += count


class Tally:
    """All scenarios of one session (tests run one at a time, but fixtures may record from threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scenarios: dict[str, ScenarioTally] = {}

    def scenario(self, name: str) -> ScenarioTally:
        """The tally of `name`, created on first use."""
        with self._lock:
            return self.scenarios.setdefault(name, ScenarioTally(name))

    def table(self) -> str:
        """The closing table: one row per scenario and a total row."""
        header = (
            "scenario",
            "faults injected",
            "migrations started",
            "finished as expected",
            "events lost",
            "work done twice",
            "poison dead-lettered / sent",
            "result",
        )
        rows: list[tuple[str, ...]] = []
        totals = ScenarioTally("TOTAL")
        for item in self.scenarios.values():
            faults = sum(item.faults.values())
            rows.append(
                (
                    item.name,
                    f"{faults} ({', '.join(f'{k} {v}' for k, v in sorted(item.faults.items()))})" if faults else "0",
                    str(item.migrations_started),
                    str(item.migrations_completed),
                    str(item.events_lost),
                    str(item.work_done_twice),
                    f"{item.poison_dead_lettered} / {item.poison_sent}" if item.poison_sent else "-",
                    {True: "pass", False: "FAIL", None: "-"}[item.passed],
                )
            )
            totals.faults.update(item.faults)
            totals.migrations_started += item.migrations_started
            totals.migrations_completed += item.migrations_completed
            totals.events_lost += item.events_lost
            totals.work_done_twice += item.work_done_twice
            totals.poison_sent += item.poison_sent
            totals.poison_dead_lettered += item.poison_dead_lettered
            totals.poison_reasons.update(item.poison_reasons)
        failed = any(item.passed is False for item in self.scenarios.values())
        rows.append(
            (
                "TOTAL",
                str(sum(totals.faults.values())),
                str(totals.migrations_started),
                str(totals.migrations_completed),
                str(totals.events_lost),
                str(totals.work_done_twice),
                f"{totals.poison_dead_lettered} / {totals.poison_sent}",
                "FAIL" if failed else "pass",
            )
        )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        out = [line(header), rule, *(line(row) for row in rows)]
        if totals.poison_reasons:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(totals.poison_reasons.items()))
            out.append(f"dead-letter reasons: {reasons}")
        return "\n".join(out)


TALLY = Tally()
"""The session's tally (the chaos conftest prints it at the end)."""
