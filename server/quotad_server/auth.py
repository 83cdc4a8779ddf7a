"""Who is calling, and what the policy lets them do.

At the edge, `Authenticator` turns a call's bearer token or its TLS client certificate into a
`Caller`. The core asks `Authorization` (the policy's `callers` section) before it decides:
which tenants a caller may act for, how its tier is chosen, which methods it may call. No
grpc here: the servicer hands over the metadata and the TLS peer's properties.

Errors say what the caller itself did wrong, and never what other tenants have.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from quotad_server.errors import PermissionDenied, Unauthenticated
from quotad_server.model import CallerRule, Method, TenantGrant
from quotad_server.policy import WILDCARD_TENANT, Policy

_log = structlog.get_logger("quotad.auth")
_TOKEN_LINE = re.compile(r"^(\S+)\s+sha256:([0-9a-fA-F]{64})$")
SHARED_TENANT = WILDCARD_TENANT
"""The tenant whose counters every tenant the policy does not name shares (unknown_tenants: shared)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: an identity from a bearer token or a client certificate, or nobody."""

    identity: str | None = None
    source: str = ""  # "token", "certificate", or "" for nobody

    def __str__(self) -> str:
        return self.identity or "an unidentified caller"


ANONYMOUS = Caller()


def hash_token(token: str) -> str:
    """The line of a tokens file for `token`, without its identity: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class TokenFile:
    """Bearer tokens, hashed, read from a file (a mounted Kubernetes Secret) and re-read when it
    changes: one `<identity> sha256:<hex of the token's SHA-256>` a line, `#` comments.

    Looked at no more than once a second. A file that no longer reads keeps the tokens already
    loaded (and says so), as a policy that does not validate keeps the old one.
    """

    CHECK_EVERY_S = 1.0

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._identities: dict[bytes, str] = {}
        self._reload()

    @staticmethod
    def parse(lines: Iterable[str], source: str) -> dict[bytes, str]:
        """Digest -> identity. Raises ValueError naming the file and the line."""
        found: dict[bytes, str] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = _TOKEN_LINE.match(line)
            if match is None:
                raise ValueError(f"{source}:{number}: expected '<identity> sha256:<64 hex digits>'")
            found[bytes.fromhex(match[2])] = match[1]
        return found

    def _reload(self) -> None:
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            with open(self._path, encoding="utf-8") as file:
                identities = self.parse(file, self._path)
        except (OSError, ValueError) as error:
            if self._stamp is None:
                raise
            _log.error("tokens file refused; keeping the tokens loaded before", error=str(error))
            return
        self._identities, self._stamp = identities, stamp
        _log.info("tokens loaded", path=self._path, tokens=len(identities))

    def identity(self, token: str) -> str | None:
        """The identity the token stands for, or None."""
        now = self._clock()
        if now - self._checked >= self.CHECK_EVERY_S:
            with self._lock:
                if now - self._checked >= self.CHECK_EVERY_S:
                    self._checked = now
                    self._reload()
        digest = hashlib.sha256(token.encode()).digest()
        for known, identity in self._identities.items():  # constant time per entry, no early exit on a prefix
            if hmac.compare_digest(known, digest):
                return identity
        return None


class Authenticator:
    """A call's `Caller`: a valid bearer token names it; else a verified client certificate
    (its first SAN URI, e.g. a SPIFFE ID, else its first DNS name); else nobody."""

    def __init__(self, tokens: TokenFile | None = None) -> None:
        self._tokens = tokens

    def caller(
        self, metadata: Iterable[tuple[str, str | bytes]], peer: Mapping[str, Iterable[bytes]]
    ) -> Caller:
        """Raises Unauthenticated for a bearer token that names nobody. `peer`: the TLS peer's
        properties (grpc's auth context: peer_uri, peer_dns)."""
        for key, value in metadata:
            if key == "authorization" and self._tokens is not None:
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated("the authorization metadata is not 'Bearer <token>'")
                identity = self._tokens.identity(token.strip())
                if identity is None:
                    raise Unauthenticated("the bearer token is not known")
                return Caller(identity, "token")
        for name in ("peer_uri", "peer_dns"):
            for value in peer.get(name, ()):
                return Caller(value.decode(errors="replace"), "certificate")
        return ANONYMOUS


class Authorization:
    """The policy's `callers` rules. Without any, every caller may do everything (the policy
    still decides how tenants it does not name are counted)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._rules = policy.callers

    @property
    def enforced(self) -> bool:
        return bool(self._rules)

    def _rule(self, caller: Caller, method: Method) -> CallerRule | None:
        """The caller's rule (None when the policy names no callers); it must allow `method`."""
        if not self._rules:
            return None
        if caller.identity is None:
            raise Unauthenticated(
                "this quotad names its callers: present a client certificate or a bearer token"
            )
        for rule in self._rules:
            if rule.pattern == caller.identity or fnmatch.fnmatchcase(caller.identity, rule.pattern):
                if method not in rule.methods:
                    raise PermissionDenied(f"{caller} may not {method.value}")
                return rule
        raise PermissionDenied(f"{caller} is not one of this quotad's callers")

    def _grant(self, caller: Caller, rule: CallerRule, tenant: str) -> TenantGrant:
        grant = rule.tenants.get(tenant) or rule.tenants.get(WILDCARD_TENANT)
        if grant is None:
            raise PermissionDenied(f"{caller} may not act for tenant {tenant!r}")
        return grant

    def _known(self, tenant: str) -> str:
        """The tenant whose counters are charged: itself, or the shared ones; refused if it must be."""
        policy = self._policy
        if tenant in policy.known_tenants or policy.unknown_tenants == "own":
            return tenant
        if policy.unknown_tenants == "refuse":
            raise PermissionDenied(f"tenant {tenant!r} is not in the policy")
        return SHARED_TENANT

    def reserve(self, caller: Caller, tenant: str, tier: str) -> tuple[str, str, str]:
        """For a CheckAndReserve: (tenant acted for, tenant charged, tier), "" meaning the default."""
        rule = self._rule(caller, Method.RESERVE)
        if rule is not None:
            tenant = tenant or rule.default_tenant
            grant = self._grant(caller, rule, tenant)
            if grant.tier is not None:
                if tier and tier != grant.tier:
                    raise PermissionDenied(f"{caller} may not choose tier {tier!r} for tenant {tenant!r}")
                tier = grant.tier
            elif grant.tiers:
                if tier and tier not in grant.tiers:
                    raise PermissionDenied(f"{caller} may not choose tier {tier!r} for tenant {tenant!r}")
                tier = tier or grant.tiers[0]
        tenant = tenant or self._policy.default_tenant
        return tenant, self._known(tenant), tier

    def settle(self, caller: Caller) -> frozenset[str] | None:
        """For a Commit or Release: the tenants whose reservations the caller may settle (None: any)."""
        rule = self._rule(caller, Method.SETTLE)
        if rule is None or WILDCARD_TENANT in rule.tenants:
            return None
        return frozenset(rule.tenants)

    def read(self, caller: Caller, tenant: str) -> tuple[str, str]:
        """For a GetUsage: (tenant read for, tenant whose counters are read)."""
        rule = self._rule(caller, Method.READ)
        if rule is not None:
            tenant = tenant or rule.default_tenant
            self._grant(caller, rule, tenant)
        tenant = tenant or self._policy.default_tenant
        return tenant, self._known(tenant)

    def accuracy(self, caller: Caller) -> None:
        """For a GetAccuracy (model statistics, no tenant's own data)."""
        self._rule(caller, Method.ACCURACY)
