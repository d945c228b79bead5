import base64
from pathlib import Path

import pytest

from gateway.config import Config, Mode, Secret
from gateway.errors import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()


def test_nothing_set_gives_embedded_defaults() -> None:
    """With no file and no variables the gateway runs on SQLite and simulators."""
    config = Config.load(env={})
    assert config.mode is Mode.DEMO
    assert config.effective_database_url == "sqlite:///var/gateway.db"
    assert config.payments == "sim"
    assert config.uses_simulators


def test_payment_check_timings_default_and_load() -> None:
    """First check 20 s after the prompt, then every 30 s; ambiguous lookups every 300 s."""
    config = Config.load(env={})
    assert (config.payment_deadline_s, config.payment_check_interval_s) == (20, 30)
    assert (config.ambiguous_recheck_s, config.payment_checks_in_flight) == (300, 32)
    changed = Config.load(
        env={
            "GATEWAY_PAYMENT_CHECK_INTERVAL_S": "10",
            "GATEWAY_AMBIGUOUS_RECHECK_S": "60",
            "GATEWAY_PAYMENT_CHECKS_IN_FLIGHT": "8",
        }
    )
    assert (changed.payment_check_interval_s, changed.ambiguous_recheck_s) == (10, 60)
    assert changed.payment_checks_in_flight == 8


def test_environment_overrides_file(tmp_path: Path) -> None:
    """A GATEWAY_* variable beats the TOML file, and CLI overrides beat both."""
    file = tmp_path / "gateway.toml"
    file.write_text('port = 9000\nservice_code = "*1#"\n[daraja]\nbase_url = "http://x"\n')
    config = Config.load(env={"GATEWAY_PORT": "9100"}, file=file, overrides={"host": "0.0.0.0"})
    assert config.port == 9100
    assert config.service_code == "*1#"
    assert config.host == "0.0.0.0"
    assert config.daraja.base_url == "http://x"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"GATEWAY_MASTER_KEY": "c2hvcnQ="}, "GATEWAY_MASTER_KEY"),
        ({"GATEWAY_MASTER_KEY": "not base64!"}, "GATEWAY_MASTER_KEY"),
        ({"GATEWAY_PAYMENTS": "paypal"}, "GATEWAY_PAYMENTS"),
        ({"GATEWAY_PAYMENT_CHECK_INTERVAL_S": "0"}, "GATEWAY_PAYMENT_CHECK_INTERVAL_S"),
        ({"GATEWAY_PAYMENT_CHECKS_IN_FLIGHT": "5000"}, "GATEWAY_PAYMENT_CHECKS_IN_FLIGHT"),
        ({"GATEWAY_COLOUR": "blue"}, "GATEWAY_COLOUR"),
        ({"GATEWAY_MODE": "production"}, "GATEWAY_PAYMENTS"),
        ({"GATEWAY_PAYMENTS": "daraja"}, "GATEWAY_DARAJA_BASE_URL"),
    ],
)
def test_bad_settings_fail_naming_the_setting(env: dict[str, str], setting: str) -> None:
    """Every malformed or missing setting raises ConfigError whose message names it."""
    with pytest.raises(ConfigError) as info:
        Config.load(env=env)
    assert info.value.setting == setting
    assert str(info.value).startswith(setting)


def test_production_refuses_simulators_and_requires_master_key() -> None:
    """Production mode needs real providers, a master key, an admin token and a callback secret."""
    env = {
        "GATEWAY_MODE": "production",
        "GATEWAY_PAYMENTS": "daraja",
        "GATEWAY_DARAJA_BASE_URL": "https://api.safaricom.co.ke",
        "GATEWAY_SMS": "africastalking",
        "GATEWAY_AFRICASTALKING_KEY": "atsk_x",
        "GATEWAY_ADMIN_TOKEN": "t" * 32,
        "GATEWAY_CALLBACK_SECRET": "s" * 32,
    }
    with pytest.raises(ConfigError, match="GATEWAY_MASTER_KEY"):
        Config.load(env=env)
    config = Config.load(env={**env, "GATEWAY_MASTER_KEY": KEY})
    assert config.master_key_bytes() == bytes(range(32))
    assert not config.uses_simulators


def test_secrets_never_show_in_repr() -> None:
    """Printing a config shows no secret value."""
    config = Config.load(env={"GATEWAY_MASTER_KEY": KEY, "GATEWAY_AFRICASTALKING_KEY": "atsk_x"})
    text = repr(config) + str(Secret("hunter2"))
    assert KEY not in text
    assert "atsk_x" not in text
    assert "hunter2" not in text


def test_fbe_timezone_must_be_an_iana_zone() -> None:
    """A zone the system does not know stops the start, naming the setting."""
    assert Config.load(env={"GATEWAY_FBE_TIMEZONE": "Africa/Lagos"}).fbe_timezone == "Africa/Lagos"
    with pytest.raises(ConfigError, match="GATEWAY_FBE_TIMEZONE"):
        Config.load(env={"GATEWAY_FBE_TIMEZONE": "Mars/Olympus"})


def test_ledger_pool_size_defaults_loads_and_is_bounded() -> None:
    """PostgreSQL connections per worker: 10 unless set, at least 1."""
    assert Config.load(env={}).ledger_pool_size == 10
    assert Config.load(env={"GATEWAY_LEDGER_POOL_SIZE": "4"}).ledger_pool_size == 4
    with pytest.raises(ConfigError):
        Config.load(env={"GATEWAY_LEDGER_POOL_SIZE": "0"})
