"""Which scope a request needs, decided on the ASGI path the app routes (never a URL rebuilt
from `Host`), and which `Host` values a keyless gateway on loopback answers."""

from __future__ import annotations

from gateway.auth.keys import KeyScope

OPEN_PATHS = frozenset({"/health", "/ready", "/ui", "/ui/", "/ui/dashboard"})
OPEN_PREFIXES = ("/ui/static/",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
LOOPBACK_BINDS = frozenset({"127.0.0.1", "localhost", "::1"})


def required_scope(path: str, *, metrics_public: bool) -> KeyScope | None:
    """The scope `path` needs; None when it is open to anyone."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if path == "/metrics":
        return None if metrics_public else KeyScope.METRICS
    if path.startswith("/admin/") or path == "/admin":
        return KeyScope.ADMIN
    if path.startswith("/ui/api/"):
        return KeyScope.METRICS
    return KeyScope.INFERENCE


def keyless_admin_refusal(method: str, headers: dict[bytes, bytes], bind_host: str) -> str | None:
    """Why a keyless gateway refuses an admin request (None: it is served).

    With no key there is no admin to tell apart, so the admin API (which loads models, and so
    runs code) is only served on loopback, and only to requests a web page cannot send across
    origins without a CORS preflight (refused while CORS is off): reads, DELETE, or a JSON body.
    """
    if bind_host not in LOOPBACK_BINDS:
        return "The admin API needs a key off loopback: set server.api_keys or server.key_db."
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if method in ("GET", "HEAD", "DELETE") or content_type == b"application/json":
        return None
    return "Without API keys, admin requests must send 'Content-Type: application/json'."


def allowed_hosts(configured: list[str], bind_host: str) -> frozenset[str] | None:
    """The `Host` names (without port) accepted; None accepts any.

    Unset: loopback names when bound to loopback (a web page's DNS-rebound name is refused),
    anything otherwise (a proxy or the cluster names the gateway; configure the names to check).
    """
    if "*" in configured:
        return None
    if configured:
        return frozenset(h.lower() for h in configured)
    return frozenset(LOOPBACK_HOSTS) if bind_host in LOOPBACK_BINDS else None


def host_name(value: bytes) -> str:
    """`Host` without its port, lower-cased (IPv6 literals keep their brackets)."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host
