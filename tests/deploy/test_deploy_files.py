"""The deploy files and docs/operations.md stay true to the code.

Static checks read the files; where the real tool is installed (caddy, promtool,
systemd-analyze) a test also runs it, and is skipped with a reason otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.app import build_app
from gateway.config import PAYMENT_PROVIDERS, SIMULATED, Config, ProviderSettings, Secret
from gateway.metrics import Metrics
from gateway.web.middleware import context_middleware

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OPERATIONS = ROOT / "docs" / "operations.md"
EXAMPLE_TOML = ROOT / "docs" / "configuration.example.toml"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
COMPOSE = DEPLOY / "compose.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
UNIT = DEPLOY / "systemd" / "sts-gateway.service"
BACKUP_UNIT = DEPLOY / "systemd" / "sts-gateway-backup.service"
BACKUP_TIMER = DEPLOY / "systemd" / "sts-gateway-backup.timer"
CONTAINERFILE = DEPLOY / "Containerfile"

# The inbound routes of the gateway (docs/architecture.md, gateway/web/), with each route's
# caller allowlist in the proxy (None: open to anyone). <secret> stands for the callback secret,
# <page> for an admin page. test_every_route_declared_in_gateway_web_is_listed keeps it complete.
ROUTES: dict[str, str | None] = {
    "/ussd/africastalking": "PROXY_AT_SOURCES",
    "/ussd/africastalking/events": "PROXY_AT_SOURCES",
    "/sms/africastalking/inbound": "PROXY_AT_SOURCES",
    "/sms/africastalking/delivery": "PROXY_AT_SOURCES",
    "/payments/daraja/<secret>/stk": "PROXY_DARAJA_SOURCES",
    "/payments/daraja/<secret>/c2b/validation": "PROXY_DARAJA_SOURCES",
    "/payments/daraja/<secret>/c2b/confirmation": "PROXY_DARAJA_SOURCES",
    "/payments/daraja/<secret>/status/result": "PROXY_DARAJA_SOURCES",
    "/payments/daraja/<secret>/status/timeout": "PROXY_DARAJA_SOURCES",
    "/payments/momo/<secret>/callback": "PROXY_MOMO_SOURCES",
    "/payments/airtel/<secret>/callback": "PROXY_AIRTEL_SOURCES",
    "/healthz": None,
    "/readyz": "PROXY_OPERATOR_NETWORKS",
    "/metrics": "PROXY_OPERATOR_NETWORKS",
    "/admin": "PROXY_OPERATOR_NETWORKS",
    "/admin/<page>": "PROXY_OPERATOR_NETWORKS",
    "/vendor/v1/<page>": "PROXY_VENDOR_SOURCES",
}


def _concrete(route: str) -> str:
    return route.replace("<secret>", "s3cr3t-path-token").replace("<page>", "stuck")


# ------------------------------------------------------------------------------- configuration


def _provider_fields() -> list[str]:
    defaults = Config()
    return [
        f.name
        for f in dataclasses.fields(Config)
        if isinstance(getattr(defaults, f.name), ProviderSettings)
    ]


def _render_default(value: object) -> str:
    """How docs/operations.md writes a default (the code span of the "default" column)."""
    if isinstance(value, Secret):
        value = value.reveal()
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list) and not value:
        return "[]"
    if isinstance(value, str) and not value:
        return '""'
    return str(value)


def _expected_settings() -> dict[str, tuple[str, str, str]]:
    """Every setting as env variable → (setting, TOML key, default), read from the dataclasses."""
    defaults = Config()
    providers = set(_provider_fields())
    expected: dict[str, tuple[str, str, str]] = {}
    for f in dataclasses.fields(Config):
        if f.name in providers:
            provider_defaults = getattr(defaults, f.name)
            for pf in dataclasses.fields(ProviderSettings):
                if pf.name == "extra":
                    continue
                env = f"GATEWAY_{f.name.upper()}_{pf.name.upper()}"
                expected[env] = (
                    f"{f.name}.{pf.name}",
                    f"[{f.name}] {pf.name}",
                    _render_default(getattr(provider_defaults, pf.name)),
                )
        else:
            expected[f"GATEWAY_{f.name.upper()}"] = (
                f.name,
                f.name,
                _render_default(getattr(defaults, f.name)),
            )
    return expected


def _documented_settings() -> dict[str, tuple[str, str, str]]:
    """The configuration table of docs/operations.md: env variable → (setting, TOML, default)."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        setting, toml_key, env, default = (c.strip("`") for c in cells[:4])
        assert env not in rows, f"{env} documented twice"
        rows[env] = (setting, toml_key, default)
    return rows


def _documented_extras() -> dict[str, str]:
    """The provider-extras table of docs/operations.md: env variable → extra name."""
    text = OPERATIONS.read_text(encoding="utf-8")
    table = text.split("**Provider extras.**", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| [^|]+ \| `([a-z_]+)` \| `(GATEWAY_[A-Z_]+)` \|", table, re.MULTILINE)
    return {env: extra for extra, env in rows}


def _extras_the_app_reads() -> set[str]:
    """Extra provider settings the composition root (gateway/app.py) reads."""
    source = (ROOT / "gateway" / "app.py").read_text(encoding="utf-8")
    return set(re.findall(r"extra(?:\.get\(|\[)\"([a-z_]+)\"", source))


def _text_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path
    yield OPERATIONS
    yield EXAMPLE_TOML


def test_operations_documents_every_setting_with_its_toml_key_and_default() -> None:
    """The configuration table lists each Config setting once, with the right key and default."""
    expected = _expected_settings()
    documented = _documented_settings()
    assert sorted(set(expected) - set(documented)) == [], "settings missing from the table"
    assert sorted(set(documented) - set(expected)) == [], "table rows that are not settings"
    for env, row in expected.items():
        assert documented[env] == row, env


def test_every_gateway_variable_in_deploy_files_is_a_setting() -> None:
    """A GATEWAY_* name in deploy/ or the docs is a Config setting or a documented extra."""
    allowed = set(_expected_settings()) | set(_documented_extras())
    found: dict[str, set[str]] = {}
    for path in _text_files():
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"(?<![A-Za-z0-9_])GATEWAY_[A-Z0-9_]*[A-Z0-9]", text):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: files for name, files in found.items() if name not in allowed}
    assert unknown == {}
    assert "GATEWAY_MASTER_KEY" in found  # the scan does find names


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _fill_placeholders(values: dict[str, str]) -> dict[str, str]:
    """Empty secrets (the operator fills them in) get plausible values; other empties stay."""
    filled = dict(values)
    for name, value in values.items():
        if not value and name.endswith(("_KEY", "_SECRET", "_TOKEN", "_USERNAME")):
            filled[name] = (
                base64.b64encode(os.urandom(32)).decode()
                if name == "GATEWAY_MASTER_KEY"
                else "placeholder-secret-value-0123456789"
            )
    return filled


def _compose_gateway_environment() -> dict[str, str]:
    text = COMPOSE.read_text(encoding="utf-8")
    block = text.split("x-gateway:", 1)[1].split("\nservices:", 1)[0]
    env = block.split("  environment:", 1)[1]
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r'^\s+(GATEWAY_[A-Z0-9_]+):\s*"?([^"\n]*)"?\s*$', env, re.MULTILINE)
    }


def test_operations_documents_every_provider_extra_the_app_reads() -> None:
    """The extras table names exactly the extras gateway/app.py reads, each under its variable."""
    documented = _documented_extras()
    assert set(documented.values()) == _extras_the_app_reads()
    prefixes = tuple(f"GATEWAY_{p.upper()}_" for p in _provider_fields())
    for env, extra in documented.items():
        assert env.startswith(prefixes), env
        assert env.endswith(f"_{extra.upper()}"), env


def test_systemd_env_example_loads_as_a_production_config() -> None:
    """The systemd env example, once its secrets are filled in, passes every start-up check."""
    values = _fill_placeholders(_read_env_file(DEPLOY / "systemd" / "gateway.env.example"))
    config = Config.load(env=values)
    assert config.mode == "production"
    assert config.effective_database_url.startswith("sqlite:")


async def test_systemd_env_example_starts_the_real_application(tmp_path: Path) -> None:
    """The filled-in systemd env example builds and starts the production app (no network used)."""
    app = await build_app(_production_config(tmp_path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/readyz")) as ready:
            assert ready.status == 200, await ready.text()
    finally:
        await server.close()
    assert (tmp_path / "gateway.db").is_file()


def test_compose_env_example_loads_as_a_multi_instance_production_config() -> None:
    """gateway.env.example plus compose's own variables load as production on PostgreSQL/Redis."""
    values = _fill_placeholders(_read_env_file(DEPLOY / "gateway.env.example"))
    environment = _compose_gateway_environment()
    assert environment, "compose.yaml sets no GATEWAY_* variable for the gateways"
    config = Config.load(env=values | environment)
    assert config.mode == "production"
    assert config.session_store == "redis"
    assert config.effective_database_url.startswith("postgresql://")


def test_configuration_example_toml_uses_only_known_provider_keys() -> None:
    """Each key in a provider table of the example is a provider setting or a documented extra."""
    document = tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(ProviderSettings)} | set(
        _documented_extras().values()
    )
    tables = {name: body for name, body in document.items() if isinstance(body, dict)}
    assert tables
    for name, body in tables.items():
        assert name in _provider_fields(), name
        assert set(body) <= known, name


def test_configuration_example_toml_loads_and_holds_no_secret() -> None:
    """docs/configuration.example.toml is valid for Config.load and leaves secrets to the env."""
    document = tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8"))
    secret_names = {"master_key", "admin_token", "callback_secret", "database_url", "passkey"}
    secret_names |= {"security_credential", "subscription_key"}
    present = set(document) | {
        f"{table}.{key}"
        for table, body in document.items()
        if isinstance(body, dict)
        for key in body
    }
    leaked = {n for n in present if n.split(".")[-1] in secret_names | {"key", "secret"}}
    assert leaked == set()
    secrets = _fill_placeholders(
        {
            "GATEWAY_MASTER_KEY": "",
            "GATEWAY_ADMIN_TOKEN": "",
            "GATEWAY_CALLBACK_SECRET": "",
            "GATEWAY_AFRICASTALKING_KEY": "",
        }
    )
    config = Config.load(env=secrets, file=EXAMPLE_TOML)
    assert config.mode == "production"


# ------------------------------------------------------------------------------------- metrics


def _exposed_metric_names() -> dict[str, str]:
    """Every series name /metrics can expose → its family name."""
    names: dict[str, str] = {}
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
        }[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


_METRIC_RE = re.compile(r"(?<![A-Za-z0-9_])gateway_[a-z0-9_]+")


def test_metric_names_in_alerts_exist() -> None:
    """Every gateway_* series an alert rule reads is one gateway/metrics.py exposes."""
    used = set(_METRIC_RE.findall(ALERTS.read_text(encoding="utf-8")))
    assert used, "the alert rules read no gateway metric"
    assert sorted(used - set(_exposed_metric_names())) == []


def test_metric_names_in_operations_exist_and_every_metric_is_documented() -> None:
    """docs/operations.md names only real metrics, and has a table row for every family."""
    text = OPERATIONS.read_text(encoding="utf-8")
    exposed = _exposed_metric_names()
    used = set(_METRIC_RE.findall(text))
    assert sorted(used - set(exposed) - set(exposed.values())) == []
    rows = set(re.findall(r"^\| `(gateway_[a-z0-9_]+)` \|", text, re.MULTILINE))
    families = set(exposed.values())
    assert {name if name in families else exposed[name] for name in rows} == families


def test_alert_state_labels_are_purchase_states() -> None:
    """The purchase states the alerts and the metrics table name are the ledger's states."""
    base = pytest.importorskip("gateway.ledger.base")
    states = {s.value for s in base.PurchaseState}
    in_alerts = set(re.findall(r'state="([a-z_]+)"', ALERTS.read_text(encoding="utf-8")))
    assert in_alerts
    assert in_alerts <= states
    row = next(
        line
        for line in OPERATIONS.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `gateway_purchases` |")
    )
    assert set(re.findall(r"`([a-z_]+)`", row.split("|")[4])) == states


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors() -> set[str]:
    text = OPERATIONS.read_text(encoding="utf-8")
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert's runbook annotation points at a heading of docs/operations.md."""
    text = ALERTS.read_text(encoding="utf-8")
    alerts = re.findall(r"- alert: (\w+)", text)
    runbooks = re.findall(r'runbook: "docs/operations\.md#([a-z0-9-]+)"', text)
    assert len(runbooks) == len(alerts) > 0
    assert sorted(set(runbooks) - _anchors()) == []


def test_links_inside_operations_resolve() -> None:
    """Every in-page link (#anchor) of docs/operations.md has a heading to land on."""
    links = set(re.findall(r"\]\(#([a-z0-9-]+)\)", OPERATIONS.read_text(encoding="utf-8")))
    assert links
    assert sorted(links - _anchors()) == []


def test_alert_rules_parse_with_the_expected_shape() -> None:
    """alerts.yml is YAML with one group of named rules, each with expr, severity, runbook."""
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["runbook"].startswith("docs/operations.md#")


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed")
    return tool


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    """The rules pass ``promtool check rules`` and their unit tests (alerts.test.yml) pass."""
    tool = _promtool()
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts.test.yml")):
        result = subprocess.run(
            [tool, *args], cwd=ALERTS.parent, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- proxy


def _caddy_lines() -> list[str]:
    lines = []
    for raw in CADDYFILE.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line:
            lines.append(line)
    return lines


def _caddy_blocks() -> list[tuple[str, list[str]]]:
    """Every ``header {`` … ``}`` block with all the lines inside it (nested ones included)."""
    blocks: list[tuple[str, list[str]]] = []
    stack: list[tuple[str, list[str]]] = []
    for line in _caddy_lines():
        if line == "}":
            blocks.append(stack.pop())
            continue
        for _header, body in stack:
            body.append(line)
        if line.endswith("{"):
            stack.append((line[:-1].strip(), []))
    assert stack == [], "unbalanced braces in the Caddyfile"
    return blocks


def _caddy_handles() -> list[tuple[list[str], list[str]]]:
    """Each ``handle`` block as (the paths it matches, its body); [] paths = the fallback."""
    matchers = {
        m.group(1): m.group(2).split()
        for line in _caddy_lines()
        if (m := re.fullmatch(r"@(\w+) path (.+)", line))
    }
    handles = []
    for header, body in _caddy_blocks():
        words = header.split()
        if not words or words[0] != "handle":
            continue
        target = words[1:]
        if not target:
            paths: list[str] = []
        elif target[0].startswith("@"):
            paths = matchers[target[0][1:]]
        else:
            paths = target
        handles.append((paths, body))
    return handles


def _path_matches(pattern: str, path: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), path) is not None


def _production_config(data_dir: Path, **settings: str) -> Config:
    """The systemd env example, its secrets filled in, with state under ``data_dir``."""
    values = _fill_placeholders(_read_env_file(DEPLOY / "systemd" / "gateway.env.example"))
    return Config.load(env=values | settings, overrides={"data_dir": data_dir})


async def _served_routes(tmp_path: Path) -> set[str]:
    """The route patterns the production app serves, with each real payment provider in turn.

    Production, because demo mode adds simulator routes that the proxy must not publish.
    """
    served: set[str] = set()
    for provider in sorted(PAYMENT_PROVIDERS - {SIMULATED}):
        config = _production_config(
            tmp_path / provider,
            GATEWAY_PAYMENTS=provider,
            **{f"GATEWAY_{provider.upper()}_BASE_URL": "https://provider.invalid"},
        )
        app = await build_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()  # runs start-up and, on close, the application's cleanup
        try:
            served |= {resource.canonical for resource in app.router.resources()}
        finally:
            await server.close()
    return served


async def test_route_list_is_what_the_application_serves(tmp_path: Path) -> None:
    """This file's route list, which the proxy is checked against, is the real app's routes."""
    served = await _served_routes(tmp_path)
    assert "/healthz" in served
    templates = {
        r: re.escape(r).replace("<secret>", "[^/]+").replace("<page>", ".*") for r in ROUTES
    }
    unlisted = [
        route
        for route in served
        if not any(re.fullmatch(t, re.sub(r"\{(\w+)\}", r"\1", route)) for t in templates.values())
    ]
    assert unlisted == []
    unserved = [
        listed
        for listed, template in templates.items()
        if not any(re.fullmatch(template, re.sub(r"\{(\w+)\}", r"\1", s)) for s in served)
    ]
    assert unserved == []


def test_every_proxy_path_is_a_gateway_route() -> None:
    """Each path the proxy opens matches at least one of the gateway's routes."""
    routes = [_concrete(r) for r in ROUTES]
    paths = [p for paths, _ in _caddy_handles() for p in paths]
    assert paths
    for pattern in paths:
        assert any(_path_matches(pattern, route) for route in routes), pattern


def test_every_route_is_published_once_behind_its_allowlist() -> None:
    """Each gateway route is matched by exactly one handle, restricted to its own callers."""
    handles = [(paths, body) for paths, body in _caddy_handles() if paths]
    for route, allowlist in ROUTES.items():
        path = _concrete(route)
        matching = [body for paths, body in handles if any(_path_matches(p, path) for p in paths)]
        assert len(matching) == 1, route
        body = "\n".join(matching[0])
        assert "import to_gateways" in body, route
        if allowlist is None:
            assert "remote_ip" not in body, route
            continue
        matcher = re.search(r"@(\w+) not remote_ip \{\$" + allowlist + r"[:}]", body)
        assert matcher is not None, f"{route} is not restricted by {allowlist}"
        assert re.search(rf"respond @{matcher.group(1)} 403", body), route


def test_every_payment_provider_has_a_restricted_callback_route() -> None:
    """Each real payment provider the config accepts has its own callback prefix in the proxy."""
    opened = {p for paths, _ in _caddy_handles() for p in paths}
    for provider in PAYMENT_PROVIDERS - {SIMULATED}:
        assert f"/payments/{provider}/*" in opened, provider
        assert any(r.startswith(f"/payments/{provider}/") for r in ROUTES), provider


def test_allowlist_defaults_fail_closed() -> None:
    """No allowlist's default opens a route wider than a /16, and unknown providers get TEST-NET."""
    text = CADDYFILE.read_text(encoding="utf-8")
    defaults = dict(re.findall(r"\{\$(PROXY_[A-Z_]+):([^}]*)\}", text))
    for name in (
        "PROXY_MOMO_SOURCES",
        "PROXY_AIRTEL_SOURCES",
        "PROXY_AT_SOURCES",
        "PROXY_VENDOR_SOURCES",
    ):
        assert defaults[name].split() == ["192.0.2.1/32"], name
    for name, value in defaults.items():
        if name.endswith(("_SOURCES", "_NETWORKS")):
            networks = [ipaddress.ip_network(item) for item in value.split()]
            assert networks, name
            assert all(n.prefixlen >= 16 for n in networks), name


def test_proxy_sets_a_fresh_request_id_and_forwards_only_through_the_snippet() -> None:
    """The one reverse_proxy sets X-Request-Id from a fresh UUID and health-checks /readyz."""
    blocks = dict(_caddy_blocks())
    snippet = blocks["(to_gateways)"]
    assert "header_up X-Request-Id {http.request.uuid}" in snippet
    assert "health_uri /readyz" in snippet
    assert sum(line.startswith("reverse_proxy") for line in _caddy_lines()) == 1


def test_proxy_upstreams_and_scrape_targets_are_the_compose_instances() -> None:
    """The proxy's default upstreams and Prometheus's targets are the compose gateway services."""
    services = set(
        re.findall(r"^  (gateway-\d+):$", COMPOSE.read_text(encoding="utf-8"), re.MULTILINE)
    )
    assert len(services) >= 2
    upstreams = re.search(r"\{\$PROXY_UPSTREAMS:([^}]*)\}", CADDYFILE.read_text(encoding="utf-8"))
    assert upstreams is not None
    assert set(upstreams.group(1).split()) == {f"{s}:8080" for s in services}
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    assert set(re.findall(r"- (gateway-\d+:8080)", scrape)) == {f"{s}:8080" for s in services}


UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _caddy_started(process: asyncio.subprocess.Process) -> None:
    assert process.stderr is not None
    async with asyncio.timeout(15):
        while line := await process.stderr.readline():
            if b"serving initial configuration" in line:
                return
    pytest.fail("caddy exited before serving its configuration")


SECRET = "s3cr3t-path-token"
# (method, path) → what the proxy must answer a caller on 127.0.0.1 when loopback is allowed for
# MoMo and Africa's Talking only, and the operator network is elsewhere.
PROBES: dict[tuple[str, str], int] = {
    ("POST", f"/payments/daraja/{SECRET}/stk"): 403,
    ("PUT", f"/payments/momo/{SECRET}/callback"): 200,
    ("POST", f"/payments/airtel/{SECRET}/callback"): 403,
    ("POST", "/ussd/africastalking"): 200,
    ("GET", "/admin"): 403,
    ("GET", "/metrics"): 403,
    ("GET", "/healthz"): 200,
    ("GET", "/payments/sim/x/callback"): 404,
    ("GET", "/etc/passwd"): 404,
}


@dataclasses.dataclass(frozen=True)
class CaddyRun:
    """What one run of the real Caddyfile in front of a recording upstream showed."""

    statuses: dict[str, int]  # path → status the client got
    echoed: dict[str, str]  # path → X-Request-Id of the response
    forwarded: list[tuple[str, CIMultiDict[str]]]  # what reached the upstream (health checks aside)
    access_log: str


async def _exercise_caddy(caddy: str, workdir: Path) -> CaddyRun:
    seen: list[tuple[str, CIMultiDict[str]]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.copy()))
        return web.Response(text="ok")

    app = web.Application(middlewares=[context_middleware])  # the gateway's own middleware
    app.router.add_route("*", "/{tail:.*}", record)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    port = _free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "PROXY_DOMAIN": f"http://127.0.0.1:{port}",
        "PROXY_UPSTREAMS": f"127.0.0.1:{upstream.port}",
        "PROXY_MOMO_SOURCES": "127.0.0.1/32",
        "PROXY_AT_SOURCES": "127.0.0.0/8 ::1/128",
        "PROXY_OPERATOR_NETWORKS": "192.0.2.0/24",
    }
    adapted = await asyncio.to_thread(
        subprocess.run,
        [caddy, "adapt", "--config", str(CADDYFILE)],
        env=env,
        capture_output=True,
        check=True,
    )
    config: dict[str, Any] = json.loads(adapted.stdout)
    config["admin"] = {"disabled": True}  # no fixed admin port in a test
    (workdir / "caddy.json").write_text(json.dumps(config))
    process = await asyncio.create_subprocess_exec(
        caddy,
        "run",
        "--config",
        str(workdir / "caddy.json"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    statuses: dict[str, int] = {}
    echoed: dict[str, str] = {}
    try:
        await _caddy_started(process)
        forged = {"X-Request-Id": "client-chosen", "X-Forwarded-For": "203.0.113.9"}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for method, path in PROBES:
                async with http.request(method, path, headers=forged) as response:
                    statuses[path] = response.status
                    echoed[path] = response.headers.get("X-Request-Id", "")
    finally:
        process.terminate()
        stdout, _ = await process.communicate()
        await upstream.close()
    forwarded = [(path, headers) for path, headers in seen if path != "/readyz"]
    return CaddyRun(statuses, echoed, forwarded, stdout.decode())


@pytest.fixture(scope="module")
def caddy_run(tmp_path_factory: pytest.TempPathFactory) -> CaddyRun:
    """The Caddyfile run once by the real Caddy (skips the proxy tests when it is missing)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy is not installed")
    return asyncio.run(_exercise_caddy(caddy, tmp_path_factory.mktemp("caddy")))


def test_proxy_refuses_callers_outside_each_routes_allowlist(caddy_run: CaddyRun) -> None:
    """A caller outside a route's allowlist gets 403 and the gateway never sees the request."""
    refused = {path for (_, path), status in PROBES.items() if status == 403}
    assert {p: caddy_run.statuses[p] for p in refused} == dict.fromkeys(refused, 403)
    assert refused.isdisjoint(path for path, _ in caddy_run.forwarded)


def test_proxy_forwards_callers_inside_the_allowlist(caddy_run: CaddyRun) -> None:
    """Allowed callers reach the gateway, each request exactly once."""
    allowed = [path for (_, path), status in PROBES.items() if status == 200]
    assert [caddy_run.statuses[p] for p in allowed] == [200] * len(allowed)
    assert [path for path, _ in caddy_run.forwarded] == allowed


def test_proxy_answers_404_outside_the_gateway_routes(caddy_run: CaddyRun) -> None:
    """Paths that are no gateway route (a simulator's callback included) end at the proxy."""
    unknown = {path for (_, path), status in PROBES.items() if status == 404}
    assert {p: caddy_run.statuses[p] for p in unknown} == dict.fromkeys(unknown, 404)


def test_proxy_replaces_forged_forwarding_headers(caddy_run: CaddyRun) -> None:
    """The gateway sees the TCP peer in X-Forwarded-For and a fresh UUID, not the client's."""
    assert caddy_run.forwarded
    for _path, headers in caddy_run.forwarded:
        assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert UUID_RE.fullmatch(headers["X-Request-Id"]), headers["X-Request-Id"]


def test_gateway_answers_with_the_proxys_request_id(caddy_run: CaddyRun) -> None:
    """The response carries the id the proxy gave the request (what the gateway logged)."""
    for path, headers in caddy_run.forwarded:
        assert caddy_run.echoed[path] == headers["X-Request-Id"], path


def test_proxy_access_log_hides_the_callback_secret(caddy_run: CaddyRun) -> None:
    """The proxy's access log shows callback paths with <secret>, never the secret itself."""
    assert "/payments/momo/<secret>/callback" in caddy_run.access_log
    assert SECRET not in caddy_run.access_log


# ------------------------------------------------------------------------------------- systemd


def _unit(path: Path = UNIT) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def test_systemd_unit_has_the_hardening_keys() -> None:
    """The unit runs unprivileged, read-only, restarted on failure, migrating before it serves."""
    unit = _unit()
    required = {
        "Service.ProtectSystem": "strict",
        "Service.NoNewPrivileges": "yes",
        "Service.Restart": "on-failure",
        "Service.PrivateTmp": "yes",
        "Service.ProtectHome": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.RestrictSUIDSGID": "yes",
    }
    for key, value in required.items():
        assert unit.get(key) == [value], key
    assert unit.get("Service.DynamicUser") == ["yes"] or "Service.User" in unit
    state = unit["Service.StateDirectory"][0]
    assert f"GATEWAY_DATA_DIR=/var/lib/{state}" in unit["Service.Environment"]
    assert unit["Service.EnvironmentFile"][0].startswith("/etc/")
    assert "0600" in UNIT.read_text(encoding="utf-8")
    assert unit["Service.ExecStartPre"][0].endswith("gateway migrate")
    assert unit["Service.ExecStart"][0].endswith("gateway serve")


def test_systemd_unit_exposure_is_low(tmp_path: Path) -> None:
    """systemd-analyze rates the unit's exposure at 2.0 or below ("OK" or better)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / "sts-gateway.service"
    copy.write_text(UNIT.read_text(encoding="utf-8"))
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if level is None:
        pytest.skip(f"systemd-analyze cannot rate units offline here: {result.stderr.strip()}")
    assert float(level.group(1)) <= 2.0, result.stdout


def test_backup_unit_copies_a_live_wal_database_with_its_uncheckpointed_commits(
    tmp_path: Path,
) -> None:
    """The backup unit's command copies commits still in the -wal file and checks the copy."""
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 command-line shell is not installed")
    unit = _unit(BACKUP_UNIT)
    environment = dict(item.split("=", 1) for item in unit["Service.Environment"])
    assert set(environment) == {"DB", "BACKUPS"}
    assert (
        environment["DB"] == f"/var/lib/private/{_unit()['Service.StateDirectory'][0]}/gateway.db"
    )
    assert unit["Service.ExecStartPost"][0].startswith(f"/usr/bin/find {environment['BACKUPS']} ")
    assert "OnCalendar=hourly" in BACKUP_TIMER.read_text(encoding="utf-8")
    command = re.fullmatch(r"/bin/sh -euc '(.*)'", unit["Service.ExecStart"][0])
    assert command is not None
    script = command.group(1).replace("$$", "$").replace("%%", "%")  # systemd's escapes
    database = tmp_path / "live" / "gateway.db"
    database.parent.mkdir()
    writer = sqlite3.connect(database, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("CREATE TABLE purchases (id INTEGER PRIMARY KEY)")
        writer.executemany("INSERT INTO purchases VALUES (?)", [(i,) for i in range(250)])
        assert (tmp_path / "live" / "gateway.db-wal").stat().st_size > 0
        subprocess.run(
            ["/bin/sh", "-euc", script],
            env={
                "PATH": os.environ.get("PATH", ""),
                "DB": str(database),
                "BACKUPS": str(tmp_path / "backups"),
            },
            check=True,
            capture_output=True,
        )
    finally:
        writer.close()
    (copy,) = (tmp_path / "backups").glob("gateway-*.db")
    with contextlib.closing(sqlite3.connect(copy)) as restored:
        assert restored.execute("SELECT count(*) FROM purchases").fetchone() == (250,)


# ----------------------------------------------------------------------------------- container


def _instructions() -> list[tuple[str, str]]:
    text = CONTAINERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_containerfile_runs_unprivileged_on_python_311_slim() -> None:
    """Every stage is python:3.11-slim; the final one runs as a non-root user with a healthcheck."""
    instructions = _instructions()
    bases = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert bases
    assert all(base.endswith("python:3.11-slim") for base in bases)
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    healthcheck = next(rest for word, rest in final if word == "HEALTHCHECK")
    assert "healthcheck.py" in healthcheck
    command = next(rest for word, rest in final if word == "CMD")
    assert json.loads(command)[:3] == ["serve", "--host", "0.0.0.0"]
    assert json.loads(next(rest for word, rest in final if word == "ENTRYPOINT")) == ["gateway"]


def test_containerfile_copies_only_files_the_ignore_list_lets_in() -> None:
    """Each COPY source exists in the repository and is re-included by the .dockerignore list."""
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            sources.extend(rest.split()[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, source


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "deploy_healthcheck", DEPLOY / "container" / "healthcheck.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_container_healthcheck_passes_only_on_a_200_from_healthz() -> None:
    """The image's probe says healthy for 200 on /healthz, unhealthy for 503 or a closed port."""
    probe = _healthcheck_module()
    status = 200

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = probe.probe_url({"GATEWAY_PORT": str(server.port)})
        assert await asyncio.to_thread(probe.check, url, 2.0) is True
        status = 503
        assert await asyncio.to_thread(probe.check, url, 2.0) is False
    finally:
        await server.close()
    closed = probe.probe_url({"GATEWAY_PORT": str(_free_port())})
    assert await asyncio.to_thread(probe.check, closed, 2.0) is False
    assert probe.probe_url({}) == "http://127.0.0.1:8080/healthz"


# ------------------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def test_compose_starts_instances_after_their_dependencies_are_healthy() -> None:
    """Both gateways wait for healthy PostgreSQL and Redis and a completed migration."""
    services = _compose()["services"]
    gateways = [name for name in services if name.startswith("gateway-")]
    assert len(gateways) >= 2
    for name in gateways:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["command"] == ["migrate"]
    for name in ("postgres", "redis", "proxy"):
        assert services[name]["healthcheck"]["test"], name
    proxy_depends = services["proxy"]["depends_on"]
    assert {g: proxy_depends[g]["condition"] for g in gateways} == dict.fromkeys(
        gateways, "service_healthy"
    )


def test_compose_keeps_secrets_in_uncommitted_env_files() -> None:
    """Env files are referenced, ignored by git, shipped as examples; no secret is inline."""
    document = _compose()
    secrets = {"GATEWAY_MASTER_KEY", "GATEWAY_ADMIN_TOKEN", "GATEWAY_CALLBACK_SECRET"}
    secrets |= {"GATEWAY_DATABASE_URL", "POSTGRES_PASSWORD", "REDIS_PASSWORD"}
    env_files: set[str] = set()
    for name, service in document["services"].items():
        env_files.update(service.get("env_file", []))
        assert not secrets & set(service.get("environment", {})), name
    assert env_files
    assert "*.env" in (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()
    for env_file in env_files:
        assert env_file.endswith(".env"), env_file
        assert (DEPLOY / f"{env_file}.example").is_file(), env_file


def test_compose_publishes_ports_only_on_the_proxy() -> None:
    """Only the proxy publishes ports (Prometheus on loopback); the data network is internal."""
    document = _compose()
    for name, service in document["services"].items():
        for port in service.get("ports", []):
            assert name == "proxy" or str(port).startswith("127.0.0.1:"), name
    networks = document["networks"]
    assert networks["data"]["internal"] is True
    assert networks["app"]["internal"] is True
    assert set(document["services"]["postgres"]["networks"]) == {"data"}
