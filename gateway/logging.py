"""Structured logging, configured once: JSON in production, the console renderer in a terminal.

Redaction is a processor placed just before the renderer: values under secret-looking keys are
replaced, and STS tokens (20 digits, grouped or not) are cut to their last four digits wherever they
appear, so a stray ``log.info("cfg", config=config)`` or a token inside a message stays safe.

Every configured secret value (database and Redis passwords, the callback secret, the admin
token, the master key, provider keys: ``register_secrets``, fed by the composition root) is
replaced by ``********`` wherever it appears in a log line, and so is the password of any URL
(``scheme://user:password@host``, ``…?password=…``); ``mask_secrets`` applies the same to text
printed outside the logs (the start-up banner, error messages).

The standard library's loggers (aiohttp's access and server logs, asyncpg, asyncio, ``warnings``)
go through structlog's ``ProcessorFormatter`` into the same stream, with the same redaction and
renderer: in JSON mode every line the process logs is one JSON object.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from types import TracebackType
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
#: ``scheme://user:password@`` in any text: the password is masked, the user kept.
_URL_PASSWORD_RE: Final = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
#: ``?password=…`` (``&sslpassword=…``) in a URL's query: the value is masked, the name kept.
_QUERY_PASSWORD_RE: Final = re.compile(r"(?P<head>[?&;][A-Za-z_]*password=)[^&#\s]+", re.IGNORECASE)
#: Fields the processor chain itself adds before ``redact``: never data, never secret.
_OWN_FIELDS: Final = frozenset({"timestamp", "level"})
_MIN_SECRET_CHARS: Final = 4  # shorter values would mask ordinary words and numbers
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secrets(*values: str | None) -> None:
    """Add configured secret values: each is masked wherever it appears in output from now on.

    Values shorter than four characters are ignored (they would mask ordinary text); a URL's
    password is masked by pattern anyway.
    """
    global _secrets  # noqa: PLW0603 - one process-wide set, read lock-free on the hot path
    with _secrets_lock:
        known = set(_secrets)
        known.update(v for v in values if v and len(v) >= _MIN_SECRET_CHARS)
        # Longest first, so a secret containing another is masked whole.
        _secrets = tuple(sorted(known, key=len, reverse=True))


def forget_secrets() -> None:
    """Drop every registered secret (tests, or a process that reconfigures)."""
    global _secrets  # noqa: PLW0603
    with _secrets_lock:
        _secrets = ()


def mask_secrets(text: str) -> str:
    """``text`` with every registered secret and every URL password replaced by ``********``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_PASSWORD_RE.sub(lambda m: m.group("head") + MASK + "@", text)
    if "password=" in text.lower():
        text = _QUERY_PASSWORD_RE.sub(lambda m: m.group("head") + MASK, text)
    return text


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
        return mask_secrets(_TOKEN_RE.sub(lambda m: mask_token(m.group(0)), value))
    if isinstance(value, Mapping):
        return {
            mask_secrets(str(k)): (MASK if _is_secret_key(str(k)) else _scrub(v))
            for k, v in value.items()
        }
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
        if name in _OWN_FIELDS and isinstance(value, str):
            continue  # the logger's own (a short secret like "2026" must not mask every line)
        if _is_secret_key(name):
            event_dict[name] = MASK
        elif name == "token" and value is not None:
            event_dict[name] = mask_token(str(getattr(value, "digits", value)))
        else:
            event_dict[name] = _scrub(value)
    return event_dict


def _renderer(*, json: bool) -> Processor:
    if json:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


def processors(*, json: bool) -> list[Processor]:
    """The processor chain, redaction just before the renderer."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
        _renderer(json=json),
    ]


def _stdlib_name(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Name the standard library logger a line came from (``logger="aiohttp.access"``)."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict.setdefault("logger", record.name)
    return event_dict


class _StdlibHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler ``configure_logging`` installs (recognised and replaced on reconfigure)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record, unless its stream was closed (a test's buffer, gone)."""
        if getattr(self.stream, "closed", False):
            return
        super().emit(record)


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    """``sys.excepthook`` in JSON mode: an uncaught exception is one JSON line, not a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("gateway").critical("uncaught_exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _route_stdlib(stream: TextIO, *, json: bool, level: int) -> None:
    """Send every standard library logger's records through structlog's chain to ``stream``."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            _stdlib_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            _renderer(json=json),
        ],
    )
    handler = _StdlibHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries below warning are chatty (asyncio debug, aiohttp access lines for every hit);
    # the gateway's own level still applies to its structlog lines.
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(capture=False)  # re-installs the hook even if one replaced it
    logging.captureWarnings(capture=True)
    if json:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def configure_logging(
    *,
    json: bool | None = None,
    level: str = "info",
    stream: TextIO | None = None,
) -> bool:
    """Configure structlog for the whole process (call once, from the composition root).

    Returns whether lines are JSON.

    Args:
        json: JSON lines when True, the console renderer when False; None → JSON unless the
            stream is a terminal.
        level: minimum level name (``debug``, ``info``, ``warning``, ``error``).
        stream: where logs go (stdout by default).
    """
    out = stream or sys.stdout
    as_json = (not out.isatty()) if json is None else json
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    _route_stdlib(out, json=as_json, level=threshold)
    structlog.configure(
        processors=processors(json=as_json),
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    return as_json


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
