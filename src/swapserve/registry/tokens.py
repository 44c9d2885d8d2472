"""Registry table of API tokens (``swapserve token create|list|revoke``): hashes only.

A token's name is unique among its active tokens (a revoked or expired one frees the name).
Creating and revoking are audited in the same transaction, with the token's name, roles and
models (never its hash).
"""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from swapserve import errors
from swapserve.identity import check_model_patterns, check_principal_name, check_token_hash, parse_roles
from swapserve.registry.engine import RegistryBase
from swapserve.registry.models import TokenRow
from swapserve.registry.records import TokenRecord


def _record(r: TokenRow) -> TokenRecord:
    return TokenRecord(id=r.id, name=r.name, sha256=r.sha256, roles=tuple(r.roles or ()),
                       models=tuple(r.models or ()), created_at=r.created_at, created_by=r.created_by,
                       expires_at=r.expires_at, revoked_at=r.revoked_at, revoked_by=r.revoked_by)


def _summary(r: TokenRow) -> dict[str, object]:
    return {"id": r.id, "name": r.name, "roles": list(r.roles or ()), "models": list(r.models or ()),
            "expires_at": r.expires_at.isoformat() if r.expires_at else None}


class TokenTables(RegistryBase):
    """API tokens with roles; the server's authenticator reads the active ones."""

    def create_token(self, name: str, sha256: str, *, roles: list[str] | tuple[str, ...],
                     models: list[str] | tuple[str, ...] = (), actor: str,
                     expires_at: datetime | None = None, reason: str = "") -> TokenRecord:
        """Store a token by its hash. AlreadyExists when an active token has this name or hash."""
        check_principal_name(name)
        digest = check_token_hash(sha256)
        role_names = sorted(r.value for r in parse_roles(list(roles)))
        if not role_names and not models:
            raise errors.InvalidInput(f"token '{name}' would grant nothing: give it --role and/or --models")
        patterns = list(check_model_patterns(list(models)))
        now = self._now()
        if expires_at is not None and expires_at <= now:
            raise errors.InvalidInput(f"token '{name}' would expire before it is created ({expires_at.isoformat()})")
        with self._write() as s:
            for row in s.scalars(sa.select(TokenRow).where(TokenRow.name == name, TokenRow.revoked_at.is_(None))):
                if row.expires_at is None or row.expires_at > now:
                    raise errors.AlreadyExists(f"an active token named '{name}' exists (id {row.id}); revoke it "
                                               f"first (`swapserve token revoke {name}`) or choose another name")
            if s.scalar(sa.select(TokenRow.id).where(TokenRow.sha256 == digest)) is not None:
                raise errors.AlreadyExists("a token with this hash is already stored; create a new token")
            row = TokenRow(name=name, sha256=digest, roles=role_names, models=patterns, created_at=now,
                           created_by=actor, expires_at=expires_at)
            s.add(row)
            s.flush()
            self._audit(s, actor=actor, action="token.create", model=None, version=None, before=None,
                        after=_summary(row), reason=reason)
            return _record(row)

    def revoke_token(self, name: str, *, actor: str, reason: str = "") -> list[TokenRecord]:
        """Revoke every active token named ``name``; NotFound when there is none."""
        check_principal_name(name)
        now = self._now()
        with self._write() as s:
            rows = [r for r in s.scalars(sa.select(TokenRow).where(TokenRow.name == name,
                                                                   TokenRow.revoked_at.is_(None)))]
            if not rows:
                raise errors.NotFound(f"no active token named '{name}' (`swapserve token list` shows them)")
            for r in rows:
                r.revoked_at, r.revoked_by = now, actor
            s.flush()
            self._audit(s, actor=actor, action="token.revoke", model=None, version=None,
                        before=[_summary(r) for r in rows], after=None, reason=reason)
            return [_record(r) for r in rows]

    def tokens(self, *, include_inactive: bool = False) -> list[TokenRecord]:
        """Tokens by id; by default only those neither revoked nor expired."""
        now = self._now()
        q = sa.select(TokenRow).order_by(TokenRow.id)
        if not include_inactive:  # revoked rows stay for the record; the servers reread the rest every 2 s
            q = q.where(TokenRow.revoked_at.is_(None))
        with self._read() as s:
            rows = [_record(r) for r in s.scalars(q)]
        return rows if include_inactive else [r for r in rows if r.active(now)]
