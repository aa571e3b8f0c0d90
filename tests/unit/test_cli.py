"""The command line: bad input gets a clear error that names the problem, and nothing is published."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamaduo.cli import app
from llamaduo.cli.adapters import materialise_adapters
from llamaduo.client import SpecError, load_spec, new_migration_id

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "spec.yaml"


def test_the_example_spec_loads_with_its_coverage_next_to_it():
    spec = load_spec(EXAMPLE)
    assert Path(spec.coverage.uri) == EXAMPLE.parent / "coverage.jsonl"
    assert spec.base_model.id == "bundled:smollm2-135m-instruct"
    migration_id = new_migration_id(spec)
    assert migration_id.startswith("commit-message-") and len(migration_id) == len("commit-message-") + 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "spec file not found"),
        ("task: [unclosed", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("task: {name: t}\n", "coverage: Field required"),
        ("task: {name: t}\ncoverage: {uri: c.jsonl}\nevaluation: {thresholds: {similarity: 0}}\n", "within 1..100"),
        ("task: {name: t}\ncoverage: {uri: c.jsonl}\ntraining: {epochs: -1}\n", "training.epochs"),
    ],
)
def test_bad_specs_are_named(tmp_path, content, message):
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError, match=message):
        load_spec(path)
    result = runner.invoke(app, ["migrate", str(path)])
    assert result.exit_code == 2
    assert message.split(":")[0] in result.output


def test_schemas_command_writes_the_contract(tmp_path):
    result = runner.invoke(app, ["schemas", "--out", str(tmp_path)])
    assert result.exit_code == 0
    assert (tmp_path / "asyncapi.yaml").is_file() and (tmp_path / "migration.graduated.json").is_file()


def test_adapter_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        materialise_adapters(["no-equals-sign"], tmp_path)
    with pytest.raises(ValueError, match="neither a PEFT adapter directory nor an adapter tar"):
        materialise_adapters([f"x={tmp_path}"], tmp_path / "cache")


def test_down_without_a_stack_says_so(tmp_path):
    result = runner.invoke(app, ["down", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no running stack" in result.output
