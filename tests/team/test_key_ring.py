"""KeyRing.from_header: the Authorization value remembered per real key, never for a wrong one,
forgotten on reload (revocation), and expiry still checked on every request."""

from __future__ import annotations

from gateway.auth.keys import ApiKey, KeyRing, digest


def _key(token: str, **kwargs: object) -> ApiKey:
    return ApiKey(id=token, name=token, digest=digest(token), **kwargs)  # type: ignore[arg-type]


def test_header_forms() -> None:
    ring = KeyRing([_key("gw-a")])
    for value in (b"Bearer gw-a", b"bearer gw-a", b"Bearer  gw-a ", b"BEARER gw-a"):
        key = ring.from_header(value)
        assert key is not None and key.name == "gw-a", value
    for value in (b"", b"Bearer", b"Bearer ", b"Basic gw-a", b"gw-a", b"Bearer gw-b", b"Bearer gw-a2"):
        assert ring.from_header(value) is None, value


def test_only_real_keys_are_remembered_and_reload_forgets() -> None:
    ring = KeyRing([_key("gw-a")])
    for i in range(50):
        assert ring.from_header(b"Bearer wrong-%d" % i) is None
    assert ring._by_header == {}  # wrong tokens never grow the table
    assert ring.from_header(b"Bearer gw-a") is not None
    assert list(ring._by_header) == [b"Bearer gw-a"]
    ring.replace([_key("gw-a", revoked=True)])  # what a reload after a revocation does
    assert ring.from_header(b"Bearer gw-a") is None
    ring.replace([])
    assert ring.from_header(b"Bearer gw-a") is None


def test_expiry_checked_on_a_remembered_value() -> None:
    ring = KeyRing([_key("gw-a", expires_at=1000.0)])
    assert ring.from_header(b"Bearer gw-a", now=999.0) is not None
    assert ring.from_header(b"Bearer gw-a", now=1000.0) is None  # remembered, but expired now
    assert ring.from_header(b"Bearer gw-a", now=999.5) is not None


def test_the_table_is_bounded() -> None:
    keys = [_key(f"gw-{i}") for i in range(30)]
    ring = KeyRing(keys)
    ring.CACHED = 10
    for i in range(30):
        assert ring.from_header(f"Bearer gw-{i}".encode()) is not None  # found either way
    assert len(ring._by_header) == 10
