"""REDIS_URL parsing (shared.cache.redis_url): every form, every error, no password shown."""

from __future__ import annotations

import pytest

from shared.cache.redis_url import RedisSpec, RedisUrlError, parse_redis_url, redact

PW = "s3cret-pw"


@pytest.mark.parametrize(
    ("url", "mode", "expected"),
    [
        (
            "redis://127.0.0.1",
            "standalone",
            RedisSpec(mode="standalone", hosts=(("127.0.0.1", 6379),)),
        ),
        (
            "redis://cache.internal:6380/2",
            "standalone",
            RedisSpec(mode="standalone", hosts=(("cache.internal", 6380),), db=2),
        ),
        (
            "redis://127.0.0.1:6379?db=3&socket_timeout=0.5&socket_connect_timeout=1",
            "standalone",
            RedisSpec(
                mode="standalone",
                hosts=(("127.0.0.1", 6379),),
                db=3,
                socket_timeout=0.5,
                socket_connect_timeout=1.0,
            ),
        ),
        (
            f"redis://app:{PW}@[::1]:7000/1?client_name=rw&max_connections=10",
            "standalone",
            RedisSpec(
                mode="standalone",
                hosts=(("::1", 7000),),
                db=1,
                username="app",
                password=PW,
                client_name="rw",
                max_connections=10,
            ),
        ),
        (
            f"redis://:{PW.replace('-', '%2D')}%40x@h/0",
            "standalone",
            RedisSpec(mode="standalone", hosts=(("h", 6379),), password=PW + "@x"),
        ),
        (
            "rediss://h:6390/0?ssl_cert_reqs=none",
            "standalone",
            RedisSpec(mode="standalone", hosts=(("h", 6390),), tls=True, ssl_cert_reqs="none"),
        ),
        (
            "rediss://h?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
            "&ssl_check_hostname=false&ssl_cert_reqs=REQUIRED",
            "standalone",
            RedisSpec(
                mode="standalone",
                hosts=(("h", 6379),),
                tls=True,
                ssl_ca_certs="/etc/ca.pem",
                ssl_certfile="/c.pem",
                ssl_keyfile="/k.pem",
                ssl_check_hostname=False,
            ),
        ),
        (
            "unix:///run/redis/redis.sock?db=4",
            "standalone",
            RedisSpec(mode="standalone", unix_socket_path="/run/redis/redis.sock", db=4),
        ),
        (
            f"unix://:{PW}@/run/redis.sock",
            "standalone",
            RedisSpec(mode="standalone", unix_socket_path="/run/redis.sock", password=PW),
        ),
        (
            f"redis+sentinel://:{PW}@s1:26379,s2,s3:26381/mymaster/2"
            f"?sentinel_password=other-pw&socket_timeout=0.2",
            "standalone",
            RedisSpec(
                mode="sentinel",
                hosts=(("s1", 26379), ("s2", 26379), ("s3", 26381)),
                service_name="mymaster",
                db=2,
                password=PW,
                sentinel_password="other-pw",
                socket_timeout=0.2,
            ),
        ),
        (
            "redis+sentinel://s1/mymaster/",
            "sentinel",
            RedisSpec(mode="sentinel", hosts=(("s1", 26379),), service_name="mymaster"),
        ),
        (
            "rediss+sentinel://s1:1/svc?ssl_cert_reqs=required",
            "standalone",
            RedisSpec(mode="sentinel", hosts=(("s1", 1),), service_name="svc", tls=True),
        ),
        (
            "redis+cluster://n1:7000,n2:7001",
            "standalone",
            RedisSpec(mode="cluster", hosts=(("n1", 7000), ("n2", 7001))),
        ),
        (
            "redis://n1:7000,n2:7001/0",
            "cluster",
            RedisSpec(mode="cluster", hosts=(("n1", 7000), ("n2", 7001))),
        ),
        (
            "rediss+cluster://n1",
            "cluster",
            RedisSpec(mode="cluster", hosts=(("n1", 6379),), tls=True),
        ),
    ],
)
def test_every_form_parses_to_its_spec(url: str, mode, expected: RedisSpec) -> None:
    assert parse_redis_url(url, mode) == expected


@pytest.mark.parametrize(
    ("url", "mode", "part"),
    [
        (f"127.0.0.1:{PW}", "standalone", "no scheme"),
        (f"http://:{PW}@h", "standalone", "scheme 'http' is unknown"),
        (f"redis://:{PW}@", "standalone", "host is missing"),
        (f"redis://:{PW}@h:", "standalone", "port of host 1 ('h') is empty"),
        (f"redis://:{PW}@h:99999", "standalone", "port of host 1 ('h') is not a number"),
        (f"redis://user:{PW}/0", "standalone", "port of host 1 ('user') is not a number"),
        (f"redis://:{PW}@h1,h2", "standalone", "2 hosts given to redis://"),
        (f"redis://:{PW}@h/x", "standalone", "database in the path must be a database number"),
        (f"redis://:{PW}@h/1/2", "standalone", "more parts than '/db'"),
        (f"redis://:{PW}@h/1?db=2", "standalone", "database is given twice"),
        (f"redis://:{PW}@h?bogus=1", "standalone", "option 'bogus' is unknown"),
        (f"redis://:{PW}@h?socket_timeout=soon", "standalone", "socket_timeout must be seconds"),
        (f"redis://:{PW}@h?socket_timeout=0", "standalone", "socket_timeout must be seconds"),
        (f"redis://:{PW}@h?max_connections=-1", "standalone", "max_connections must be"),
        (f"redis://:{PW}@h?db=1&db=2", "standalone", "option db is given twice"),
        (f"redis://:{PW}@h?client_name=", "standalone", "client_name is empty"),
        (f"redis://:{PW}@h?ssl_cert_reqs=none", "standalone", "ssl_cert_reqs needs TLS"),
        (f"rediss://:{PW}@h?ssl_cert_reqs=maybe", "standalone", "ssl_cert_reqs must be one of"),
        (f"rediss://:{PW}@h?ssl_check_hostname=2", "standalone", "must be true or false"),
        (f"redis://:{PW}@h#frag", "standalone", "fragment"),
        (f"redis://:{PW}@h?novalue", "standalone", "not name=value pairs"),
        (f"redis://:{PW}@[::1:7000", "standalone", "unclosed IPv6"),
        (f"redis://:{PW}@::1:7000", "standalone", "several ':'"),
        (f"redis://:{PW}@h_!x", "standalone", "characters a host cannot have"),
        (f"redis://:{PW}@:6379", "standalone", "a port but no host"),
        ("redis://user:@h", "standalone", "password after ':' in the user-info is empty"),
        (f"unix://:{PW}@host/run/r.sock", "standalone", "unix:// takes no host"),
        (f"unix://:{PW}@", "standalone", "socket path is missing"),
        (f"redis+sentinel://:{PW}@s1,s2", "standalone", "sentinel service name is missing"),
        (f"redis+sentinel://:{PW}@s1,,s2/m", "standalone", "host 2 is empty"),
        (f"redis+cluster://:{PW}@n1/1", "standalone", "Redis Cluster has only database 0"),
        (f"redis://:{PW}@n1?sentinel_password=x", "standalone", "only applies to redis+sentinel"),
        (f"redis://:{PW}@h/0", "sentinel", "REDIS_MODE=sentinel does not match"),
        (f"redis+cluster://:{PW}@h", "sentinel", "REDIS_MODE=sentinel does not match"),
        (f"redis+sentinel://:{PW}@h/m", "cluster", "REDIS_MODE=cluster does not match"),
    ],
)
def test_every_error_names_its_part_and_never_the_password(url: str, mode, part: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url, mode)
    message = str(caught.value)
    assert part in message
    assert PW not in message
    assert PW not in repr(caught.value)
    assert caught.value.__cause__ is None or PW not in str(caught.value.__cause__)


def test_a_spec_never_shows_its_passwords() -> None:
    spec = parse_redis_url(f"redis+sentinel://u:{PW}@s1/m?sentinel_password={PW}x")
    assert spec.password == PW
    assert spec.sentinel_password == PW + "x"
    assert PW not in repr(spec)
    assert PW not in str(spec)
    assert PW not in spec.describe()
    assert spec.describe() == "sentinel service 'm' via sentinels s1:26379"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{PW}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://app:{PW}@h", "redis://app:***@h"),
        (f"redis://app:p@ss:{PW}@h", "redis://app:***@h"),
        (f"rediss+sentinel://:{PW}@s1,s2/m?sentinel_password={PW}", None),
        (f"redis+cluster://:{PW}@[::1]:7000", "redis+cluster://:***@[::1]:7000"),
        (f"unix://:{PW}@/run/r.sock", "unix://:***@/run/r.sock"),
        (f"nonsense :{PW}@ password={PW}", None),
        (f"redis://h/0?password={PW}&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_hides_every_password(url: str, shown: str | None) -> None:
    redacted = redact(url)
    assert PW not in redacted
    if shown is not None:
        assert redacted == shown


def test_the_settings_redaction_hides_a_sentinel_password_too() -> None:
    from shared.settings import redact_url

    shown = redact_url(f"redis+sentinel://:{PW}@s1,s2/m?sentinel_password={PW}x&db=1")
    assert PW not in shown
    assert shown == "redis+sentinel://:***@s1,s2/m?sentinel_password=***&db=1"
