"""Poison messages: hypothesis strategies for bodies no service can use, and the hand-written cases with the reason
each must be dead-lettered with."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from llamaduo.contract import MAX_EVENT_BYTES

KNOWN_REASONS = frozenset(
    {
        "invalid_json",
        "schema_violation",
        "unknown_schema_version",
        "wrong_event_type",
        "oversized_event",
        "missing_artifact",
        "checksum_mismatch",
        "artifact_outside_store",
    }
)
"""Every reason a poison message may be parked with; anything else means a message was misread."""

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def random_bodies() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes (mostly not JSON at all)."""
    return st.binary(min_size=0, max_size=300)


def wrong_schema_bodies(valid: dict[str, Any], required: list[str]) -> st.SearchStrategy[bytes]:
    """Valid JSON that is not a valid event: other JSON values, objects missing required fields, and the valid
    event with one required field dropped or replaced by a list (which pydantic never coerces into a string, a
    number or a model)."""
    non_objects = json_values.filter(lambda v: not isinstance(v, dict))
    strangers = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in valid), json_values, max_size=5)

    @st.composite
    def mutated(draw: st.DrawFn) -> dict[str, Any]:
        body = dict(valid)
        body[draw(st.sampled_from(required))] = draw(st.lists(json_values, min_size=0, max_size=3))
        return body

    @st.composite
    def dropped(draw: st.DrawFn) -> dict[str, Any]:
        body = dict(valid)
        del body[draw(st.sampled_from(required))]
        return body

    objects = st.one_of(non_objects, strangers, mutated(), dropped())
    return objects.map(lambda value: json.dumps(value).encode())


def examples(strategy: st.SearchStrategy[bytes], count: int) -> list[bytes]:
    """`count` examples of `strategy`, the same ones on every run (derandomized, no example database)."""
    found: list[bytes] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def collect(body: bytes) -> None:
        found.append(body)

    collect()
    return list(dict.fromkeys(found))  # distinct bodies


def oversized(valid: dict[str, Any], limit: int = MAX_EVENT_BYTES) -> bytes:
    """The valid event padded past the size limit (still valid JSON)."""
    body = dict(valid)
    body["padding"] = "x" * (limit + 1)
    return json.dumps(body).encode()
