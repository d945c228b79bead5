"""Structured logging, configured once: JSON in production, the console renderer in a terminal.

Redaction is a processor placed just before the renderer: values under secret-looking keys are
replaced, and STS tokens (20 digits, grouped or not) are cut to their last four digits wherever they
appear, so a stray ``log.info("cfg", config=config)`` or a token inside a message stays safe.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

SECRET_KEYS: Final = frozenset(
    {
        "api_key",
        "apikey",
        "password",
        "passkey",
        "secret",
        "vending_key",
        "decoder_key",
        "master_key",
        "authorization",
        "admin_token",
        "consumer_secret",
        "access_token",
        "key",
    }
)
_SECRET_SUFFIXES: Final = ("_key", "_secret", "_password", "_token")
_TOKEN_RE: Final = re.compile(r"(?<!\d)(?:\d{4}[ -]?){4}\d{4}(?!\d)")
MASK: Final = "********"


def mask_token(digits: str) -> str:
    """A token shown to its last four digits: ``****-****-****-****-1234``."""
    only = re.sub(r"\D", "", digits)
    return "****-****-****-****-" + only[-4:]


def _is_secret_key(name: str) -> bool:
    lowered = name.lower()
    if lowered in {"token", "token_masked"}:
        return False  # tokens are masked, not hidden: their last 4 digits help support
    return lowered in SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def _scrub(value: object) -> object:
    if isinstance(value, str):
        return _TOKEN_RE.sub(lambda m: mask_token(m.group(0)), value)
    if isinstance(value, Mapping):
        return {k: (MASK if _is_secret_key(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return _scrub(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, int | float | bool) or value is None:
        return value
    return _scrub(repr(value))


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Hide secrets and cut tokens to their last four digits (a structlog processor)."""
    for name in list(event_dict):
        value = event_dict[name]
        if _is_secret_key(name):
            event_dict[name] = MASK
        elif name == "token" and value is not None:
            event_dict[name] = mask_token(str(getattr(value, "digits", value)))
        else:
            event_dict[name] = _scrub(value)
    return event_dict


def processors(*, json: bool) -> list[Processor]:
    """The processor chain, redaction just before the renderer."""
    renderer: Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]


def configure_logging(
    *,
    json: bool | None = None,
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the whole process (call once, from the composition root).

    Args:
        json: JSON lines when True, the console renderer when False; None → JSON unless the
            stream is a terminal.
        level: minimum level name (``debug``, ``info``, ``warning``, ``error``).
        stream: where logs go (stdout by default).
    """
    out = stream or sys.stdout
    as_json = (not out.isatty()) if json is None else json
    structlog.configure(
        processors=processors(json=as_json),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


class CachedLogger:
    """A structlog logger bound once, and bound again only when the configuration changes.

    ``structlog.get_logger()`` returns a lazy proxy that builds a new bound logger (a logger
    from the factory, the wrapper, a context) on every call: about 5 µs even for a debug line
    the level filter then drops. This one keeps the bound logger and checks, per call, that the
    configuration (processors, wrapper, logger factory, context class) is still the one it was
    bound under (under a microsecond), so ``configure_logging``, ``structlog.reset_defaults``
    and ``structlog.testing.capture_logs`` still take effect at once.
    """

    __slots__ = ("_bound", "_config", "_values")

    def __init__(self, **values: Any) -> None:  # noqa: ANN401 - initial context values
        self._values = values
        self._bound: Any = None
        self._config: tuple[object, ...] = ()

    def _logger(self) -> Any:  # noqa: ANN401 - structlog's bound logger type is configurable
        config = structlog.get_config()
        seen = self._config
        if (
            not seen
            or seen[0] is not config["processors"]
            or seen[1] is not config["wrapper_class"]
            or seen[2] is not config["logger_factory"]
            or seen[3] is not config["context_class"]
        ):
            self._bound = structlog.get_logger().bind(**self._values)
            self._config = (
                config["processors"],
                config["wrapper_class"],
                config["logger_factory"],
                config["context_class"],
            )
        return self._bound

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - debug, info, bind …
        return getattr(self._logger(), name)


def get_logger(**values: Any) -> CachedLogger:  # noqa: ANN401 - initial context values
    """A logger for a module's hot path: ``structlog.get_logger()`` without its per-call cost."""
    return CachedLogger(**values)


def bind(**values: Any) -> None:  # noqa: ANN401 - context values of any loggable type
    """Bind values (request_id, session_id, purchase_id …) to the current task's log context."""
    structlog.contextvars.bind_contextvars(**values)


def snapshot() -> MutableMapping[str, Any]:
    """The current task's bound log context (for handing to a background task)."""
    return structlog.contextvars.get_contextvars()
