"""Structured logs: one JSON object a line, carrying migration_id, iteration and event_id when known."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("migration_id", "iteration", "event_id", "stage", "delivery")
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

REDACTED = "***"
SECRET_NAME = re.compile(
    r"(?i)(^|[_-])(api[_-]?key|secret|secret[_-]?(access[_-])?key|passw(or)?d|token|credentials?|private[_-]?key"
    r"|authorization|session[_-]?token)$"
)
"""Environment variables and log fields whose names match hold secrets."""
MIN_SECRET_CHARS = 6
"""Shorter values (`1`, `true`) are not taken for secrets: replacing them would garble every line."""
_SECRET_SHAPES = (
    # URL user-info: nats://user:password@host, https://key@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\"']*:)[^@\s/\"']+@"), rf"\g<1>{REDACTED}@"),
    # Authorization headers and bearer tokens
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\g<1> {REDACTED}"),
    # OpenAI-style and similar API keys
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_-]{16,}"), REDACTED),
    # key=value / "key": "value" pairs whose key names a secret
    (
        re.compile(
            r"(?i)([\"']?[A-Za-z0-9_-]*(?:api[_-]?key|secret[_-]?key|secret|password|passwd|token)[\"']?\s*[:=]\s*[\"']?)"
            r"(?!\*\*\*)[^\s\"',;}&]{4,}"
        ),
        rf"\g<1>{REDACTED}",
    ),
)


class Redactor:
    """Removes secrets from log text: values registered or found in the environment, and secret-shaped tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()

    def register(self, *values: str | None) -> None:
        """Never log these values (API keys, S3 secrets, NATS passwords)."""
        with self._lock:
            self._values.update(v for v in values if v and len(v) >= MIN_SECRET_CHARS)

    def register_environment(self, environ: Mapping[str, str] | None = None) -> None:
        """Register the value of every environment variable whose name says it holds a secret."""
        env = os.environ if environ is None else environ
        self.register(*(value for name, value in env.items() if SECRET_NAME.search(name)))

    def values(self) -> Iterable[str]:
        """The registered secret values (longest first, so one containing another is removed whole)."""
        with self._lock:
            return sorted(self._values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.values():
            if value in text:
                text = text.replace(value, REDACTED)
        for pattern, replacement in _SECRET_SHAPES:
            text = pattern.sub(replacement, text)
        return text


redactor = Redactor()
"""The process's redactor: `configure_logging` fills it from the environment; `redactor.register(...)` adds more."""


def _redact_fields(value: Any) -> Any:
    """A copy of `value` with the values of secret-named keys replaced, at any depth."""
    if isinstance(value, Mapping):
        return {k: REDACTED if SECRET_NAME.search(str(k)) else _redact_fields(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_fields(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object with the service name and any `extra` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = REDACTED if SECRET_NAME.search(key) else _redact_fields(value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        # Last, on the whole line: a secret may hide in a message, an exception or a nested field.
        return redactor(json.dumps(payload, default=str))


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log record of this process to stderr as JSON lines."""
    redactor.register_environment()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("werkzeug", "urllib3", "httpx", "httpcore", "openai", "filelock", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library warnings become JSON records too
    _silence_progress_bars()


def _silence_progress_bars() -> None:
    """Progress bars would break the one-JSON-object-a-line rule; our progress events replace them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds bound context (migration_id, iteration, event_id, ...) to every record."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs

    def bind(self, **context: Any) -> ContextLogger:
        """A child logger with more context."""
        merged: dict[str, Any] = dict(self.extra or {})
        merged.update({k: v for k, v in context.items() if v is not None})
        return ContextLogger(self.logger, merged)


def get_logger(name: str, **context: Any) -> ContextLogger:
    """A context logger for `name`."""
    clean: Mapping[str, Any] = {k: v for k, v in context.items() if v is not None}
    return ContextLogger(logging.getLogger(name), dict(clean))
