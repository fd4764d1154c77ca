"""Dashboard access tokens: the hub's admin token sees every tenant; a per-tenant
read-only token (stored as its SHA-256 in the registry) sees one tenant, an
all-tenants one (stored for tenant ``"*"``) every tenant. Stored tokens survive hub
restarts; the hub's admin token is new at every start."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import attrs

from ..registry._registry import Registry

__all__ = ["ALL_TENANTS", "TOKEN_PREFIX", "Access", "create_token", "hash_token", "resolve_token"]

ALL_TENANTS = "*"
"""The stored tenant of a dashboard token that sees every tenant."""

TOKEN_PREFIX = "actd_"
MAX_TOKEN_LENGTH = 256


@attrs.frozen
class Access:
    """Who a request is: ``tenant_id`` ``None`` is the admin (every tenant)."""

    tenant_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None

    def may_see(self, tenant_id: str | None) -> bool:
        return self.tenant_id is None or tenant_id == self.tenant_id


def hash_token(token: str) -> str:
    """The stored form of a token (a token is 256 random bits: a plain SHA-256 is enough)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(registry: Registry, tenant_id: str | None) -> str:
    """A new read-only dashboard token for ``tenant_id`` (``None``: every tenant, like
    the hub's admin token but surviving restarts); only its hash is stored."""
    if tenant_id == ALL_TENANTS:
        raise ValueError("invalid tenant id '*' (for every tenant, ask for tenant None)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    registry.add_dashboard_token(tenant_id or ALL_TENANTS, hash_token(token))
    return token


def resolve_token(registry: Registry, admin_token: str, token: str) -> Access | None:
    """The access ``token`` grants, or ``None`` (blocking: call it from a worker thread)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    if hmac.compare_digest(token.encode("utf-8", "surrogatepass"), admin_token.encode()):
        return Access(None)
    if not token.startswith(TOKEN_PREFIX):
        return None
    tenant = registry.dashboard_token_tenant(hash_token(token))
    if tenant is None:
        return None
    return Access(None if tenant == ALL_TENANTS else tenant)
