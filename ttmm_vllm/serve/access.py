"""Who may call, and how many at once: what every front door (gRPC, HTTP) shares.

A transport extracts what it was given (the `authorization` value, "Bearer <token>", and for
mutual TLS the peer certificate's subject); `Access.client` turns that into the service's
`Client` (an identity and the experts its groups permit). `Admission` bounds the requests in
flight: doors that share one `Access` share one bound and one `ttmm_inflight_requests` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Iterator, Mapping
from typing import Any

from ttmm_vllm.serve.errors import PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from ttmm_vllm.serve.service import Client


class Admission:
    """A bounded count of admitted requests: full answers at once, never queues without end.

    `per_client`: the most one authenticated client (token identity or certificate subject)
    may hold at once, so one client cannot take every slot (None: half of `limit`); clients
    without a proven identity share the whole bound. `gauge` (a Prometheus gauge, optional)
    follows the count."""

    def __init__(self, limit: int, gauge: Any = None, per_client: int | None = None):
        self.limit = limit
        self.per_client = max(1, limit // 2) if per_client is None else per_client
        self.count = 0
        self.closed = False
        self.gauge = gauge
        self.by_client: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @staticmethod
    def _key(client: Client | None) -> str | None:
        return client.identity if client is not None and client.authenticated else None

    def enter(self, client: Client | None = None) -> None:
        if self.closed:
            raise Unavailable("server is shutting down")
        if self.count >= self.limit:
            raise ResourceExhausted(
                f"server is at capacity ({self.limit} requests in flight); retry later")
        key = self._key(client)
        if key is not None:
            held = self.by_client.get(key, 0)
            if held >= self.per_client:
                raise ResourceExhausted(
                    f"{key} has {held} requests in flight, its share of this server; retry "
                    "when one finishes")
            self.by_client[key] = held + 1
        self.count += 1
        self._idle.clear()
        self._show()

    def leave(self, client: Client | None = None) -> None:
        key = self._key(client)
        if key is not None:
            left = self.by_client.get(key, 0) - 1
            if left > 0:
                self.by_client[key] = left
            else:
                self.by_client.pop(key, None)
        self.count -= 1
        if self.count == 0:
            self._idle.set()
        self._show()

    @contextlib.contextmanager
    def admitted(self, n: int = 1, client: Client | None = None) -> Iterator[None]:
        """Admit `n` requests at once (all or none), for the duration of the block."""
        entered = 0
        try:
            for _ in range(n):
                self.enter(client)
                entered += 1
            yield
        finally:
            for _ in range(entered):
                self.leave(client)

    async def drained(self) -> None:
        await self._idle.wait()

    def _show(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.count)


# In client_groups, the group that stands for every group (an unrestricted identity).
ALL_GROUPS = "*"


def bearer_token(authorization: str | None) -> str:
    """The token of an `authorization` value "Bearer <token>" ("" when there is none)."""
    auth = authorization or ""
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


class Access:
    """Bearer tokens -> identities -> expert groups, and the admission bound of the doors that
    share it. Build one per server with `Access.from_config`."""

    def __init__(self, service, *, tokens: Mapping[str, str] | None = None,
                 admin_tokens: frozenset[str] = frozenset(),
                 client_groups: Mapping[str, tuple[str, ...]] | None = None,
                 max_inflight: int = 256, max_inflight_per_client: int | None = None):
        check_auth(tokens or {}, admin_tokens, client_groups or {})
        self.tokens = dict(tokens or {})
        self.admin_tokens = frozenset(admin_tokens)
        self.admission = Admission(max_inflight, service.metrics.inflight,
                                   per_client=max_inflight_per_client)
        # identity -> the expert groups it may use ("*": all). When any is configured, an
        # identity not listed may use none; the groups' members are looked up in the live
        # manifest at each request (service.permitted), so experts added later are covered.
        self.groups: dict[str, frozenset[str]] | None = {
            ident: frozenset(gs) for ident, gs in client_groups.items()
        } if client_groups else None

    @classmethod
    def from_config(cls, service, config) -> Access:
        """From a config with `tokens`, `admin_tokens`, `client_groups`, `max_inflight`,
        `max_inflight_per_client` (grpc_server.ServerConfig)."""
        return cls(service, tokens=config.tokens, admin_tokens=config.admin_tokens,
                   client_groups=config.client_groups, max_inflight=config.max_inflight,
                   max_inflight_per_client=getattr(config, "max_inflight_per_client", None))

    @property
    def authenticates(self) -> bool:
        return bool(self.tokens or self.admin_tokens)

    def client(self, authorization: str | None, *, admin: bool = False,
               peer: str | None = None, header: str = "authorization") -> Client:
        """Authenticate: a bearer token (when tokens are configured), else the peer's
        certificate subject (mutual TLS), else "anonymous". `header` names where the token
        was expected, for the error message."""
        identity = None
        if self.authenticates:
            token = bearer_token(authorization).encode()
            if admin:  # an empty token is never an admin's, whatever the configuration says
                if not token or not any(hmac.compare_digest(token, t.encode())
                                        for t in self.admin_tokens if t):
                    raise Unauthenticated("admin token required")
                return Client(identity="admin", authenticated=True)
            for t, ident in self.tokens.items():
                if token and t and hmac.compare_digest(token, t.encode()):
                    identity = ident
                    break
            if identity is None:
                raise Unauthenticated(f"missing or invalid bearer token ({header})")
        elif admin:
            raise PermissionDenied("admin RPCs need an admin token")
        authenticated = identity is not None or peer is not None
        if identity is None:
            identity = peer or "anonymous"
        groups = None if self.groups is None else self.groups.get(identity, frozenset())
        if groups is not None and ALL_GROUPS in groups:
            groups = None
        return Client(identity=identity, groups=groups, authenticated=authenticated)


def check_tls(cert: str | None, key: str | None, client_ca: str | None) -> None:
    """The TLS flags both doors take: a certificate needs its key, and mutual TLS needs TLS
    (a client CA alone would leave the door listening in plaintext). ValueError otherwise."""
    if bool(cert) != bool(key):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert and "
                         "--tls-key); only one was given")
    if client_ca and not cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: "
                         "without them the server would listen in plaintext")


def check_auth(tokens: Any, admin_tokens: Any, client_groups: Any) -> None:
    """Refuse an authentication configuration that would not mean what it says (ValueError
    naming the field): a string where a list belongs (a set of its characters would let any
    one-letter token in), an empty token (a request without a header would carry it), an
    identity or group that is not a non-empty string."""
    def is_text(x: Any) -> bool:
        return isinstance(x, str) and x.strip() == x and bool(x)

    if not isinstance(tokens, Mapping):
        raise ValueError(f"tokens must map token -> identity, got {type(tokens).__name__}")
    for t, ident in tokens.items():
        if not is_text(t):
            raise ValueError("tokens: every token must be a non-empty string without "
                             "surrounding whitespace")
        if not is_text(ident):
            raise ValueError("tokens: every identity must be a non-empty string")
    if isinstance(admin_tokens, str | bytes) or not isinstance(
            admin_tokens, list | tuple | set | frozenset):
        raise ValueError(f"admin_tokens must be a list of tokens, got "
                         f"{type(admin_tokens).__name__}")
    if not all(is_text(t) for t in admin_tokens):
        raise ValueError("admin_tokens: every token must be a non-empty string without "
                         "surrounding whitespace")
    if set(admin_tokens) & set(tokens):
        raise ValueError("a token is both a client token and an admin token")
    if not isinstance(client_groups, Mapping):
        raise ValueError(f"client_groups must map identity -> [group, ...], got "
                         f"{type(client_groups).__name__}")
    for ident, gs in client_groups.items():
        if not is_text(ident):
            raise ValueError("client_groups: every identity must be a non-empty string")
        if isinstance(gs, str | bytes) or not isinstance(gs, list | tuple | set | frozenset):
            raise ValueError(f"client_groups[{ident!r}] must be a list of groups, got "
                             f"{type(gs).__name__}")
        if not all(is_text(g) for g in gs):
            raise ValueError(f"client_groups[{ident!r}]: every group must be a non-empty "
                             "string")
