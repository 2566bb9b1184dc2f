"""REDIS_URL, parsed without any I/O into a `RedisSpec` (README "Running in production").

Forms:

    redis://[[user]:password@]host[:port][/db][?option=value...]
    rediss://...                                         TLS (ssl_* options below)
    unix://[[user]:password@]/path/to/redis.sock[?db=N]
    redis+sentinel://[[user]:password@]h1:p1,h2:p2/service_name[/db][?option...]
    rediss+sentinel://...                                TLS to the data nodes
    redis+cluster://[[user]:password@]h1:p1,h2:p2[?option...]
    rediss+cluster://...                                 TLS
    redis://h1:p1,h2:p2 with REDIS_MODE=cluster          the same as redis+cluster://

Credentials in the URL are those of the data nodes (the master, the replicas, the
cluster nodes). Sentinels usually run without a password; when they have one, give it
as `sentinel_password` (and `sentinel_username`) in the query string, so the two are
never confused. Every error names the part that is wrong and never prints a password;
`redact` is the only way a URL may reach a log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote

Mode = Literal["standalone", "sentinel", "cluster"]

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_CERT_REQS = ("none", "optional", "required")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_TLS_OPTIONS = frozenset(
    {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
)
_FLOAT_OPTIONS = frozenset({"socket_timeout", "socket_connect_timeout"})
_OPTIONS = (
    _TLS_OPTIONS
    | _FLOAT_OPTIONS
    | {"db", "max_connections", "client_name", "sentinel_username", "sentinel_password"}
)
_USERINFO = re.compile(r":[^@\s]*@")
_SECRET_QUERY = re.compile(r"((?:^|[?&;])[^=&;#]*password=)([^&;#]*)", re.IGNORECASE)


class RedisUrlError(ValueError):
    """REDIS_URL is malformed; the message names the wrong part, never the password."""

    def __init__(self, url: str, problem: str) -> None:
        # The URL itself is not repeated: a malformed one may hide its password where
        # `redact` cannot find it (e.g. `redis://user:password/0`, its '@' missing).
        del url
        super().__init__(f"REDIS_URL is not valid: {problem}")


@dataclass(frozen=True)
class RedisSpec:
    """What to connect to and how: the only input of `shared.cache.connection`."""

    mode: Mode
    hosts: tuple[tuple[str, int], ...] = ()
    unix_socket_path: str | None = None
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool | None = None
    socket_timeout: float | None = None
    socket_connect_timeout: float | None = None
    max_connections: int | None = None
    client_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """Where this points, for logs: mode and addresses, no credentials."""
        if self.unix_socket_path:
            where = f"unix:{self.unix_socket_path}"
        else:
            where = ",".join(f"{host}:{port}" for host, port in self.hosts)
        if self.mode == "sentinel":
            where = f"service {self.service_name!r} via sentinels {where}"
        tls = " (TLS)" if self.tls else ""
        return f"{self.mode} {where}{tls}"


def redact(url: str) -> str:
    """`url` with every password replaced by `***`; safe on any string, parseable or not."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(":***@", url))
    authority_end = rest.find("?")
    authority = rest if authority_end < 0 else rest[:authority_end]
    at = authority.rfind("@")
    if at >= 0:
        userinfo = authority[:at]
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            rest = f"{user}:***@{rest[at + 1 :]}"
    return f"{scheme}://" + _SECRET_QUERY.sub(r"\1***", rest)


def parse_redis_url(url: str, mode: Mode = "standalone") -> RedisSpec:
    """Parse REDIS_URL (see the module's docstring); `mode` is REDIS_MODE.

    REDIS_MODE=cluster turns a `redis://`/`rediss://` URL into a cluster address;
    otherwise the scheme decides, and a REDIS_MODE that contradicts it is an error.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisUrlError(url, "it has no scheme (expected e.g. redis://host:6379/0)")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise RedisUrlError(url, f"the scheme {scheme!r} is unknown (use one of {known})")
    url_mode, tls = _SCHEMES[scheme]
    if mode == "cluster" and url_mode == "standalone" and scheme != "unix":
        url_mode = "cluster"
    elif mode != "standalone" and mode != url_mode:
        hint = {
            "sentinel": "redis+sentinel://host1:26379,host2:26379/service_name",
            "cluster": "redis+cluster://host1:6379,host2:6379",
        }[mode]
        raise RedisUrlError(
            url, f"REDIS_MODE={mode} does not match the scheme {scheme}:// (use {hint})"
        )

    rest, _, fragment = rest.partition("#")
    if fragment:
        raise RedisUrlError(url, "a '#fragment' has no meaning in a Redis URL")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if scheme == "unix":
        # unix://[userinfo@]/path: the authority holds only the credentials.
        authority, path = authority, slash + path
    userinfo, at, hostlist = authority.rpartition("@")
    username, password = _credentials(url, userinfo) if at else (None, None)
    options = _options(url, query, tls=tls)
    db = _db_option(url, options.pop("db", None))

    hosts: tuple[tuple[str, int], ...] = ()
    unix_path = None
    service = None
    if scheme == "unix":
        if hostlist:
            raise RedisUrlError(url, f"unix:// takes no host ({hostlist!r}); write unix:///path")
        unix_path = unquote(path)
        if unix_path in ("", "/"):
            raise RedisUrlError(url, "the socket path is missing (unix:///path/to/redis.sock)")
    else:
        default = DEFAULT_SENTINEL_PORT if url_mode == "sentinel" else DEFAULT_PORT
        hosts = _hosts(url, hostlist, default)
        if url_mode == "standalone" and len(hosts) > 1:
            raise RedisUrlError(
                url,
                f"{len(hosts)} hosts given to {scheme}://, which takes one "
                "(for several use redis+sentinel:// or redis+cluster://)",
            )
        segments = [unquote(s) for s in path.split("/")] if path else []
        if segments and segments[-1] == "":
            segments.pop()
        if url_mode == "sentinel":
            if not segments or not segments[0]:
                raise RedisUrlError(
                    url, "the sentinel service name is missing (.../service_name[/db])"
                )
            service, segments = segments[0], segments[1:]
        if len(segments) > 1:
            raise RedisUrlError(url, f"the path '/{path}' has more parts than '/db'")
        if segments:
            if db is not None:
                raise RedisUrlError(url, "the database is given twice (path and ?db=)")
            db = _db_option(url, segments[0], where="the database in the path")
    if url_mode == "cluster" and db:
        raise RedisUrlError(url, f"Redis Cluster has only database 0, not {db}")
    if url_mode != "sentinel":
        for name in ("sentinel_username", "sentinel_password"):
            if name in options:
                raise RedisUrlError(url, f"the option {name} only applies to redis+sentinel://")

    return RedisSpec(
        mode=url_mode,
        hosts=hosts,
        unix_socket_path=unix_path,
        service_name=service,
        db=db or 0,
        username=username,
        password=password,
        tls=tls,
        ssl_cert_reqs=str(options.get("ssl_cert_reqs", "required")),
        ssl_ca_certs=_str_or_none(options.get("ssl_ca_certs")),
        ssl_certfile=_str_or_none(options.get("ssl_certfile")),
        ssl_keyfile=_str_or_none(options.get("ssl_keyfile")),
        ssl_check_hostname=_bool_or_none(options.get("ssl_check_hostname")),
        socket_timeout=_float_or_none(options.get("socket_timeout")),
        socket_connect_timeout=_float_or_none(options.get("socket_connect_timeout")),
        max_connections=_int_or_none(options.get("max_connections")),
        client_name=_str_or_none(options.get("client_name")),
        sentinel_username=_str_or_none(options.get("sentinel_username")),
        sentinel_password=_str_or_none(options.get("sentinel_password")),
    )


# -- parts ---------------------------------------------------------------------------------


def _credentials(url: str, userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        # `redis://name@host`: redis-py reads a bare user-info as the username.
        return (unquote(user) or None), None
    if not password:
        raise RedisUrlError(url, "the password after ':' in the user-info is empty")
    return (unquote(user) or None), unquote(password)


def _hosts(url: str, hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        raise RedisUrlError(url, "the host is missing (e.g. redis://127.0.0.1:6379)")
    hosts = []
    for number, item in enumerate(hostlist.split(","), start=1):
        label = f"host {number}"
        if not item:
            raise RedisUrlError(url, f"{label} is empty (a stray ',' in the host list?)")
        if item.startswith("["):
            host, bracket, tail = item[1:].partition("]")
            if not bracket or not host:
                raise RedisUrlError(url, f"{label} has an unclosed IPv6 '[' bracket")
            if tail and not tail.startswith(":"):
                raise RedisUrlError(url, f"{label} ({host!r}) has text after ']' other than :port")
            port_text = tail[1:] if tail else ""
        else:
            host, colon, port_text = item.partition(":")
            if colon and not port_text:
                raise RedisUrlError(url, f"the port of {label} ({host!r}) is empty")
            if ":" in port_text:
                raise RedisUrlError(url, f"{label} has several ':' (IPv6? write [addr]:port)")
        if not host:
            raise RedisUrlError(url, f"{label} has a port but no host name")
        if not re.fullmatch(r"[A-Za-z0-9._:%-]+", host):
            raise RedisUrlError(url, f"the name of {label} has characters a host cannot have")
        port = default_port
        if port_text:
            # The text is not echoed: a URL missing its '@' puts a password here.
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65_535:
                raise RedisUrlError(
                    url, f"the port of {label} ({host!r}) is not a number from 1 to 65535"
                )
            port = int(port_text)
        hosts.append((host, port))
    return tuple(hosts)


def _options(url: str, query: str, *, tls: bool) -> dict[str, object]:
    options: dict[str, object] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise RedisUrlError(url, "the query string is not name=value pairs") from None
    for name, value in pairs:
        if name not in _OPTIONS:
            known = ", ".join(sorted(_OPTIONS))
            raise RedisUrlError(url, f"the option {name!r} is unknown (known: {known})")
        if name in options:
            raise RedisUrlError(url, f"the option {name} is given twice")
        if name in _TLS_OPTIONS and not tls:
            raise RedisUrlError(url, f"the option {name} needs TLS (a rediss scheme)")
        options[name] = _option_value(url, name, value)
    return options


def _option_value(url: str, name: str, value: str) -> object:
    if name in _FLOAT_OPTIONS:
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not 0 < number <= 300:
            raise RedisUrlError(url, f"the option {name} must be seconds in (0, 300]")
        return number
    if name == "max_connections":
        if not value.isdigit() or not 1 <= int(value) <= 100_000:
            raise RedisUrlError(url, "the option max_connections must be a positive integer")
        return int(value)
    if name == "ssl_cert_reqs":
        if value.lower() not in _CERT_REQS:
            raise RedisUrlError(
                url, f"the option ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}"
            )
        return value.lower()
    if name == "ssl_check_hostname":
        if value.lower() not in _TRUE + _FALSE:
            raise RedisUrlError(url, "the option ssl_check_hostname must be true or false")
        return value.lower() in _TRUE
    if not value:
        raise RedisUrlError(url, f"the option {name} is empty")
    return value


def _db_option(url: str, value: object, *, where: str = "the option db") -> int | None:
    if value is None:
        return None
    text = str(value)
    if not text.isdigit() or int(text) > 10_000:
        raise RedisUrlError(url, f"{where} must be a database number, not {text!r}")
    return int(text)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _float_or_none(value: object) -> float | None:
    return value if isinstance(value, float) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _bool_or_none(value: object) -> bool | None:
    return value if isinstance(value, bool) else None
