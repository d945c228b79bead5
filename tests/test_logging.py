import io
import json
import logging
import warnings

import structlog
from structlog.testing import capture_logs

from gateway.config import Config, Secret
from gateway.logging import (
    configure_logging,
    forget_secrets,
    get_logger,
    mask_token,
    redact,
    register_secrets,
)

TOKEN = "70630503470028726114"


def _render(**fields: object) -> str:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        structlog.get_logger().info("event_happened", **fields)
    finally:
        structlog.reset_defaults()
    return stream.getvalue()


def test_token_is_cut_to_last_four_digits() -> None:
    """A token logged under ``token`` shows only its last four digits."""
    line = json.loads(_render(token=TOKEN))
    assert line["token"] == "****-****-****-****-6114"


def test_tokens_inside_text_are_masked_too() -> None:
    """A token embedded in free text (grouped or not) is masked wherever it appears."""
    out = _render(sms="Token 7063 0503 4700 2872 6114 units 10.0", raw=TOKEN.encode())
    assert TOKEN not in out
    assert "7063 0503" not in out
    assert "6114" in out


def test_secret_keys_are_hidden() -> None:
    """Values under secret-looking keys never reach the output, nested or not."""
    out = _render(api_key="atsk_live", body={"Password": "pw", "passkey": "pk"}, vending_key="ab")
    for secret in ("atsk_live", '"pw"', '"pk"', '"ab"'):
        assert secret not in out


def test_config_logged_whole_stays_safe() -> None:
    """Logging the whole Config object leaks none of its secrets."""
    config = Config.load(env={"GATEWAY_AFRICASTALKING_KEY": "atsk_live_123"})
    out = _render(config=config, secret_obj=Secret("hunter2"))
    assert "atsk_live_123" not in out
    assert "hunter2" not in out


def test_redact_processor_usable_with_capture_logs() -> None:
    """The processor can be used directly on an event dict."""
    event = redact(None, "info", {"event": "x", "token": TOKEN, "admin_token": "t"})
    assert event == {"event": "x", "token": mask_token(TOKEN), "admin_token": "********"}


def test_a_cached_logger_follows_every_reconfiguration() -> None:
    """``get_logger()`` keeps its bound logger, yet a new configuration takes effect at once."""
    log = get_logger()
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging(json=True, stream=first)
        log.info("to_first", token=TOKEN)
        configure_logging(json=True, level="warning", stream=second)
        log.info("dropped")
        log.warning("to_second")
        structlog.reset_defaults()
        with capture_logs() as captured:
            log.info("captured")
    finally:
        structlog.reset_defaults()
    assert json.loads(first.getvalue())["token"] == "****-****-****-****-6114"
    assert [json.loads(line)["event"] for line in second.getvalue().splitlines()] == ["to_second"]
    assert [entry["event"] for entry in captured] == ["captured"]


def test_registered_secrets_and_url_passwords_are_masked_anywhere() -> None:
    """A configured secret inside any text (a callback URL, an error) never reaches the line."""
    secret = "cb-0123456789abcdef"
    register_secrets(secret)
    try:
        line = json.loads(
            _render(
                url=f"http://gw/payments/daraja/{secret}/stk",
                error=ValueError(f"bad {secret}"),
                dsn="postgresql://app:hunter2@db:5432/ledger",
            )
        )
    finally:
        forget_secrets()
    assert line["url"] == "http://gw/payments/daraja/********/stk"
    assert secret not in line["error"]
    assert line["dsn"] == "postgresql://app:********@db:5432/ledger"


def test_standard_library_loggers_write_json_through_the_same_redaction() -> None:
    """asyncpg's, aiohttp's and ``warnings`` lines come out as JSON, secrets masked."""
    stream = io.StringIO()
    register_secrets("s3cret-value-42")
    configure_logging(json=True, stream=stream)
    try:
        logging.getLogger("asyncpg.pool").warning("lost connection to %s", "s3cret-value-42")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
        logging.getLogger("aiohttp.server").error(
            "Error handling request", exc_info=RuntimeError("boom")
        )
    finally:
        structlog.reset_defaults()
        forget_secrets()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["logger"] == "asyncpg.pool"
    assert lines[0]["event"] == "lost connection to ********"
    assert lines[0]["level"] == "warning"
    assert any(line.get("logger") == "py.warnings" for line in lines)
    assert "RuntimeError: boom" in lines[-1]["exception"]


def test_a_password_in_a_url_query_is_masked_and_registered() -> None:
    """``postgresql://app@db/ledger?password=…`` (libpq, asyncpg, redis-py accept it) is masked.

    The banner prints the database URL whole: the password must not ride in its query string.
    """
    config = Config(
        database_url="postgresql://app@db:5432/ledger?sslmode=require&password=hunter22%21",
        redis_url="redis://cache:6379/0?PassWord=s3cr3t-redis",
    )
    assert "hunter22!" in config.secret_values()
    assert "hunter22%21" in config.secret_values()
    assert "s3cr3t-redis" in config.secret_values()
    line = json.loads(
        _render(dsn=config.database_url, redis="redis://cache/0?db=1&password=other-pw")
    )
    assert line["dsn"] == "postgresql://app@db:5432/ledger?sslmode=require&password=********"
    assert line["redis"] == "redis://cache/0?db=1&password=********"


def test_a_short_secret_never_masks_the_lines_own_timestamp_or_level() -> None:
    """A 4-character secret equal to the year (or ``info``) leaves every line parseable.

    The timestamp and the level are the logger's own, never data: a weak password ``2026``
    masked the year of every timestamp (``********-12-04T…``) and broke log ingestion.
    """
    register_secrets("2026", "info")
    try:
        line = json.loads(_render(note="paid 2026 with info"))
    finally:
        forget_secrets()
    assert line["note"] == "paid ******** with ********"
    assert line["level"] == "info"
    assert "*" not in line["timestamp"]
