"""schemas/ is the public contract: it must match the code exactly (run `make schemas` after a change)."""

from pathlib import Path

import yaml

from llamaduo.contract import ALL_EVENTS
from llamaduo.contract.schemas import asyncapi_document, rendered

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_folder_matches_the_code():
    expected = rendered()
    on_disk = {p.name: p.read_text() for p in SCHEMAS.iterdir() if p.suffix in (".json", ".yaml")}
    stale = sorted(set(on_disk) - set(expected))
    missing = sorted(set(expected) - set(on_disk))
    changed = sorted(name for name in expected if name in on_disk and on_disk[name] != expected[name])
    assert not (stale or missing or changed), (
        f"schemas/ drifted from the code (run `make schemas`): stale={stale} missing={missing} changed={changed}"
    )


def test_asyncapi_names_every_event_channel_and_operation():
    document = yaml.safe_load(yaml.safe_dump(asyncapi_document()))
    assert document["asyncapi"].startswith("3.")
    addresses = {channel.get("address") for channel in document["channels"].values()}
    for event in ALL_EVENTS:
        assert f"llamaduo.v1.{event.name}" in addresses
    assert any(op["action"] == "receive" for op in document["operations"].values())
    assert "CloudEventHeaders" in document["components"]["schemas"]
