"""Who is calling: API keys to tenants and roles, and the access rules of the gRPC server.

A keys file is one JSON object mapping each key to its tenant and role:

    {"k-3f9a...": {"tenant": "acme", "role": "admin"},
     "k-77c1...": {"tenant": "globex", "role": "user"}}

Clients send `authorization: Bearer KEY` metadata. Without a keys file every caller is
trusted (the server then listens on loopback addresses only) and is an admin that may name
any tenant. Roles: `admin` manages adapters and may act for any tenant; `user` generates
for its own tenant and uses public adapters and its tenant's private ones.

This module knows nothing about the engine or protobufs; it raises `Refused` with the
gRPC status the server should answer.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import grpc

ROLES = ("admin", "user")


class Refused(Exception):
    """A refused call: the gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Identity:
    tenant: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


TRUSTED = Identity("", "admin")     # every caller when no keys are configured


class KeyRing:
    """API keys (None: no keys, every caller trusted) and the rules that use them."""

    def __init__(self, keys: dict[str, Identity] | None = None):
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Read a keys file; errors name the entry (by position, never the key itself)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"API keys file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"API keys file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not data:
            raise ValueError(f"API keys file {path}: expected a non-empty JSON object "
                             '{"KEY": {"tenant": "...", "role": "admin|user"}, ...}')
        keys = {}
        for i, (key, entry) in enumerate(data.items()):
            where = f"API keys file {path}, entry {i + 1}"
            if len(key) < 8:
                raise ValueError(f"{where}: keys must be at least 8 characters long")
            if not isinstance(entry, dict) or set(entry) - {"tenant", "role"}:
                raise ValueError(f"{where}: expected {{\"tenant\": ..., \"role\": ...}}, got "
                                 f"{entry!r}")
            tenant, role = entry.get("tenant"), entry.get("role", "user")
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"{where}: tenant {tenant!r} must be a non-empty string")
            if role not in ROLES:
                raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
            keys[key] = Identity(tenant, role)
        return cls(keys)

    def identify(self, metadata) -> Identity:
        """The caller of a call with this invocation metadata; UNAUTHENTICATED if unknown."""
        if self.keys is None:
            return TRUSTED
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "no API key: send metadata 'authorization: Bearer KEY'")
        scheme, _, key = str(values[0]).partition(" ")
        identity = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if identity is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "the API key is not valid (expected 'authorization: Bearer KEY' "
                              "with a key from the server's keys file)")
        return identity


def tenant_for(identity: Identity, asked: str) -> str:
    """The tenant a request runs as: the one it names if allowed, else the key's."""
    if not asked or asked == identity.tenant or identity.admin:
        return asked or identity.tenant
    raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"tenant {asked!r} is not yours: this API key belongs to tenant "
                      f"{identity.tenant!r}")


def require_admin(identity: Identity, action: str) -> None:
    if not identity.admin:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"{action} needs the admin role; tenant {identity.tenant!r} has role "
                          f"{identity.role!r}")


def may_use(identity: Identity, tenant: str, owner: str) -> bool:
    """Whether a caller (acting as `tenant`) may use an adapter owned by `owner` ("" public)."""
    return not owner or identity.admin or owner == tenant


def check_adapter(identity: Identity, tenant: str, name: str, owner: str) -> None:
    if not may_use(identity, tenant, owner):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"adapter {name!r} is private to another tenant; tenant {tenant!r} "
                          f"may use public adapters and its own")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
