"""Which failures the task runtime retries and which it dead-letters at once, and under what reason."""

import pytest

from llamaduo.bus.worker import TaskError, terminal_reason
from llamaduo.contract import PoisonMessage
from llamaduo.data import DatasetError
from llamaduo.llm import LLMRequestError, LLMUnavailable
from llamaduo.store import ArtifactMissing, ChecksumMismatch


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PoisonMessage("schema_violation", "bad"), "schema_violation"),
        (ArtifactMissing("file:///x", "artifact does not exist"), "missing_artifact"),
        (ChecksumMismatch("file:///x", "sha256 mismatch"), "checksum_mismatch"),
        (DatasetError("line 3: invalid JSON"), "invalid_dataset"),
        (TaskError("all_judgments_failed", "all 4 failed"), "all_judgments_failed"),
        (
            LLMRequestError("the service LLM rejected the API key", 401, reason="invalid_api_key"),
            "service_llm:invalid_api_key",
        ),
        (LLMRequestError("unknown model gpt-9", 404, reason="unknown_model"), "service_llm:unknown_model"),
    ],
)
def test_terminal_failures_are_named(error, reason):
    found = terminal_reason(error)
    assert found is not None and found[0] == reason


@pytest.mark.parametrize(
    "error", [LLMUnavailable("429 storm", retry_after_s=3), ConnectionError("reset"), RuntimeError("?")]
)
def test_transient_failures_are_retried(error):
    assert terminal_reason(error) is None
