"""The service-LLM client: any OpenAI-compatible chat API, asked for JSON, rate-limited, retried, cached and costed."""

from llamaduo.llm.budget import SpendCap, SpendCapReached
from llamaduo.llm.client import (
    ITEM_ERROR_STATUS,
    Ledger,
    LLMError,
    LLMReply,
    LLMReplyError,
    LLMRequestError,
    LLMStats,
    LLMUnavailable,
    ServiceLLM,
    TokenLogprob,
    Usage,
    extract_json,
    request_error_reason,
    request_key,
    retry_after_seconds,
)
from llamaduo.llm.limits import RateLimits, TokenBucket, shared_limits
from llamaduo.llm.settings import DEFAULT_PRICES, ResolvedLLM, ServiceLLMSettings, price_of, resolve

__all__ = [
    "DEFAULT_PRICES",
    "ITEM_ERROR_STATUS",
    "LLMError",
    "LLMReply",
    "LLMReplyError",
    "LLMRequestError",
    "LLMStats",
    "LLMUnavailable",
    "Ledger",
    "RateLimits",
    "ResolvedLLM",
    "ServiceLLM",
    "ServiceLLMSettings",
    "SpendCap",
    "SpendCapReached",
    "TokenBucket",
    "TokenLogprob",
    "Usage",
    "extract_json",
    "price_of",
    "request_error_reason",
    "request_key",
    "resolve",
    "retry_after_seconds",
    "shared_limits",
]
