"""One frozen ``Config``, built in one place from a TOML file and ``GATEWAY_*`` variables.

No other module reads ``os.environ``. Precedence: built-in defaults < the TOML file (``--config``)
< environment variables < command-line flags. Every bad setting fails at start-up with a
``ConfigError`` that names the setting (``GATEWAY_MASTER_KEY: not 32 bytes of base64``).

With nothing set, ``gateway serve`` runs on the embedded defaults: a SQLite file under
``./var``, the local token engine with a generated test vending key, and every provider simulated
on loopback. ``mode = "production"`` refuses simulators and requires a master key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string whose ``repr``/``str`` never show it; ``.reveal()`` does, on purpose."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """The secret itself: call only where it is handed to the party that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __bool__(self) -> bool:
        return bool(self._value)


class Mode(StrEnum):
    """Demo runs on simulators; production refuses them."""

    DEMO = "demo"
    PRODUCTION = "production"


SIMULATED: Final = "sim"
PAYMENT_PROVIDERS: Final = frozenset({SIMULATED, "daraja", "momo", "airtel"})
SMS_PROVIDERS: Final = frozenset({SIMULATED, "africastalking"})
SESSION_STORES: Final = frozenset({"memory", "sqlite", "redis"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    """Credentials and base URL of one external provider (empty when simulated)."""

    base_url: str = ""
    username: str = ""  # AT username; MoMo API user; Airtel client id (Daraja: unused)
    key: Secret = field(default_factory=lambda: Secret(""))  # AT api key; consumer key; API key
    secret: Secret = field(default_factory=lambda: Secret(""))  # consumer secret; Airtel secret
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)  # shortcode, passkey …


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Every setting of a gateway instance. Build with ``Config.load``; never mutate."""

    mode: Mode = Mode.DEMO
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("var")
    database_url: str = ""  # "" → sqlite:///<data_dir>/gateway.db
    master_key: Secret | None = None  # 32 bytes, base64: seals vending keys (AES-GCM)
    admin_token: Secret | None = None  # bearer token for /admin; generated in demo mode
    callback_secret: Secret | None = None  # path segment of /payments/<provider>/<secret>/…
    callback_allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    public_url: str = ""  # how providers reach us (callback URLs); "" → http://host:port
    service_code: str = "*384*123#"
    shortcode: str = "20880"  # SMS shortcode customers text
    country: str = "KE"  # default region for phone numbers
    currency: str = "KES"
    fbe_timezone: str = "Africa/Nairobi"  # free basic electricity follows this zone's months
    payments: str = SIMULATED  # sim | daraja | momo | airtel
    sms: str = SIMULATED  # sim | africastalking
    session_store: str = "sqlite"  # memory | sqlite | redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    resume_window_s: int = 120
    payment_first_check_s: int = 20  # the first status query, this long after the prompt
    payment_check_interval_s: int = 30  # then it is queried again this often
    payment_expiry_s: int = 3600  # after this an unconfirmed purchase expires
    ambiguous_recheck_s: int = 300  # an ambiguous lost-push lookup is repeated this often
    payment_checks_in_flight: int = 32  # status queries the sweeper keeps in flight at once
    ledger_pool_size: int = 10  # PostgreSQL connections per worker process at most
    sweep_interval_s: float = 5.0
    log_json: bool | None = None  # None → JSON unless stdout is a terminal
    log_level: str = "info"
    africastalking: ProviderSettings = field(default_factory=ProviderSettings)
    daraja: ProviderSettings = field(default_factory=ProviderSettings)
    momo: ProviderSettings = field(default_factory=ProviderSettings)
    airtel: ProviderSettings = field(default_factory=ProviderSettings)

    @property
    def payment_deadline_s(self) -> int:
        """The old name of ``payment_first_check_s`` (it was never a deadline)."""
        return self.payment_first_check_s

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'gateway.db'}"

    @property
    def effective_public_url(self) -> str:
        """The base URL providers call back on."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def uses_simulators(self) -> bool:
        """Whether any provider is simulated."""
        return SIMULATED in {self.payments, self.sms}

    def secret_values(self) -> list[str]:
        """Every configured secret, in the clear: for ``gateway.logging.register_secrets`` only.

        The master key, admin token, callback secret, the database and Redis URL passwords,
        and each provider's key, secret and secret-looking extras (passkey, security
        credential, subscription key).
        """
        values = [
            secret.reveal()
            for secret in (self.master_key, self.admin_token, self.callback_secret)
            if secret is not None
        ]
        for url in (self.database_url, self.redis_url):
            for password in _url_passwords(url):
                values += [password, unquote(password)]  # as written in the URL, and decoded
        for name in _PROVIDERS:
            settings: ProviderSettings = getattr(self, name)
            values += [settings.key.reveal(), settings.secret.reveal()]
            values += [
                value
                for key, value in settings.extra.items()
                if key in _SECRET_EXTRAS or key.endswith(("key", "secret", "password"))
            ]
        return [value for value in values if value]

    def master_key_bytes(self) -> bytes | None:
        """The 32-byte master key, decoded (validated at load)."""
        return None if self.master_key is None else _decode_master_key(self.master_key)

    @classmethod
    def load(
        cls,
        *,
        env: Mapping[str, str],
        file: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Defaults < TOML ``file`` < ``GATEWAY_*`` in ``env`` < ``overrides`` (CLI flags).

        Raises:
            ConfigError: a setting is unknown or malformed; the message names it.
        """
        values: dict[str, Any] = {}
        if file is not None:
            try:
                values.update(_flatten(tomllib.loads(file.read_text(encoding="utf-8"))))
            except OSError as exc:
                raise ConfigError("--config", f"cannot read {file}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError("--config", f"{file} is not valid TOML: {exc}") from exc
        for name, raw in env.items():
            if name.startswith("GATEWAY_"):
                values[name.removeprefix("GATEWAY_").lower()] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return _build(values)


_FIELDS: Final = {f.name: f for f in dataclasses.fields(Config)}
_WEEK_S: Final = 7 * 86400
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "port": (0, 65535),
    "resume_window_s": (1, _WEEK_S),
    "payment_first_check_s": (1, _WEEK_S),
    "payment_check_interval_s": (1, _WEEK_S),
    "payment_expiry_s": (1, _WEEK_S),
    "ambiguous_recheck_s": (1, _WEEK_S),
    "payment_checks_in_flight": (1, 1024),
    "ledger_pool_size": (1, 1000),
}
#: Old setting names still accepted (TOML key or ``GATEWAY_*`` variable) → the setting's name.
ALIASES: Final[Mapping[str, str]] = {"payment_deadline_s": "payment_first_check_s"}
_PROVIDERS: Final = ("africastalking", "daraja", "momo", "airtel")
_PROVIDER_FIELDS: Final = ("base_url", "username", "key", "secret")
_SECRET_EXTRAS: Final = frozenset({"passkey", "security_credential", "subscription_key"})


def _url_passwords(url: str) -> list[str]:
    """The URL's passwords as written (percent-encoded), none when it has none.

    ``scheme://user:password@host/…``, and any ``password`` (or ``sslpassword``) in its query
    (``…/db?password=…``), which libpq, asyncpg and redis-py accept too.
    """
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if name.lower().endswith("password"):
            found.append(value)
    return [value for value in found if value]


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".lower()
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def _setting(name: str) -> str:
    return f"GATEWAY_{name.upper()}"


def _as_bool(name: str, value: Any) -> bool:  # noqa: ANN401 - TOML or env text
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(_setting(name), f"expected true or false, got {value!r}")


def _as_int(name: str, value: Any, *, low: int, high: int) -> int:  # noqa: ANN401
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise ConfigError(_setting(name), f"expected a whole number, got {value!r}") from exc
    if not low <= number <= high:
        raise ConfigError(_setting(name), f"must be between {low} and {high}, got {number}")
    return number


def _decode_master_key(secret: Secret) -> bytes:
    try:
        raw = base64.b64decode(secret.reveal(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("GATEWAY_MASTER_KEY", "not 32 bytes of base64") from exc
    if len(raw) != 32:
        raise ConfigError("GATEWAY_MASTER_KEY", f"not 32 bytes of base64 (decodes to {len(raw)})")
    return raw


def _one_of(name: str, value: Any, allowed: frozenset[str]) -> str:  # noqa: ANN401
    text = str(value).strip().lower()
    if text not in allowed:
        raise ConfigError(_setting(name), f"expected one of {sorted(allowed)}, got {value!r}")
    return text


def _renamed(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with old setting names (``ALIASES``) renamed; the new name wins over the old."""
    renamed = {ALIASES.get(name, name): value for name, value in values.items()}
    renamed.update({name: values[name] for name in ALIASES.values() if name in values})
    return renamed


def _build(values: dict[str, Any]) -> Config:  # noqa: C901, PLR0912 - one branch per setting kind
    kwargs: dict[str, Any] = {}
    providers: dict[str, dict[str, Any]] = {p: {} for p in _PROVIDERS}
    for name, value in _renamed(values).items():
        provider = next((p for p in _PROVIDERS if name.startswith(f"{p}_")), None)
        if provider is not None:
            key = name.removeprefix(f"{provider}_")
            if key in {"key", "secret"}:
                providers[provider][key] = Secret(str(value))
            elif key in _PROVIDER_FIELDS:
                providers[provider][key] = str(value)
            else:
                providers[provider].setdefault("extra", {})[key] = str(value)
            continue
        if name not in _FIELDS or name.startswith("_"):
            raise ConfigError(_setting(name), "unknown setting")
        if name in {"master_key", "admin_token", "callback_secret"}:
            kwargs[name] = Secret(str(value)) if str(value) else None
        elif name == "mode":
            kwargs[name] = Mode(_one_of(name, value, frozenset(m.value for m in Mode)))
        elif name in _INT_RANGES:
            low, high = _INT_RANGES[name]
            kwargs[name] = _as_int(name, value, low=low, high=high)
        elif name == "sweep_interval_s":
            try:
                kwargs[name] = float(value)
            except ValueError as exc:
                raise ConfigError(_setting(name), f"expected seconds, got {value!r}") from exc
        elif name == "log_json":
            kwargs[name] = _as_bool(name, value)
        elif name == "data_dir":
            kwargs[name] = Path(str(value))
        elif name == "payments":
            kwargs[name] = _one_of(name, value, PAYMENT_PROVIDERS)
        elif name == "sms":
            kwargs[name] = _one_of(name, value, SMS_PROVIDERS)
        elif name == "session_store":
            kwargs[name] = _one_of(name, value, SESSION_STORES)
        elif name == "callback_allow_from":
            items = value if isinstance(value, list) else str(value).split(",")
            try:
                kwargs[name] = tuple(
                    ipaddress.ip_network(str(item).strip()) for item in items if str(item).strip()
                )
            except ValueError as exc:
                raise ConfigError(_setting(name), f"not a list of networks: {exc}") from exc
        else:
            kwargs[name] = str(value)
    for provider, settings in providers.items():
        if settings:
            kwargs[provider] = ProviderSettings(**settings)
    config = Config(**kwargs)
    _check(config)
    return config


def _check(config: Config) -> None:  # noqa: C901 - one rule per line, read top to bottom
    """Cross-setting rules, checked once at load."""
    if config.master_key is not None:
        _decode_master_key(config.master_key)
    if config.mode is Mode.PRODUCTION:
        if config.payments == SIMULATED:
            raise ConfigError("GATEWAY_PAYMENTS", "production mode refuses the simulator")
        if config.sms == SIMULATED:
            raise ConfigError("GATEWAY_SMS", "production mode refuses the simulator")
        if config.master_key is None:
            raise ConfigError("GATEWAY_MASTER_KEY", "production mode requires a master key")
        if config.admin_token is None:
            raise ConfigError("GATEWAY_ADMIN_TOKEN", "production mode requires an admin token")
        if config.callback_secret is None or len(config.callback_secret.reveal()) < 16:
            raise ConfigError(
                "GATEWAY_CALLBACK_SECRET", "production mode requires at least 16 characters"
            )
    if config.payments != SIMULATED:
        settings: ProviderSettings = getattr(config, config.payments)
        if not settings.base_url:
            raise ConfigError(_setting(f"{config.payments}_base_url"), "required")
    if config.sms != SIMULATED and not config.africastalking.key:
        raise ConfigError("GATEWAY_AFRICASTALKING_KEY", "required to send SMS")
    if not config.currency.isalpha() or len(config.currency) != 3:
        raise ConfigError("GATEWAY_CURRENCY", f"not an ISO 4217 code: {config.currency!r}")
    try:
        ZoneInfo(config.fbe_timezone)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise ConfigError(
            "GATEWAY_FBE_TIMEZONE", f"not an IANA time zone: {config.fbe_timezone!r}"
        ) from exc
