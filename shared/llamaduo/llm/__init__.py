"""The service-LLM client: any OpenAI-compatible chat API, asked for JSON, retried, cached and costed."""

from llamaduo.llm.client import (
    ITEM_ERROR_STATUS,
    Ledger,
    LLMError,
    LLMReply,
    LLMReplyError,
    LLMRequestError,
    LLMUnavailable,
    ServiceLLM,
    Usage,
    extract_json,
    request_key,
    retry_after_seconds,
)
from llamaduo.llm.settings import ResolvedLLM, ServiceLLMSettings, resolve

__all__ = [
    "ITEM_ERROR_STATUS",
    "LLMError",
    "LLMReply",
    "LLMReplyError",
    "LLMRequestError",
    "LLMUnavailable",
    "Ledger",
    "ResolvedLLM",
    "ServiceLLM",
    "ServiceLLMSettings",
    "Usage",
    "extract_json",
    "request_key",
    "resolve",
    "retry_after_seconds",
]
