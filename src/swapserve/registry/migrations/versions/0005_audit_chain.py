"""The audit log becomes a hash chain: ``audit_log`` gains ``prev_hash`` and ``hash``
(swapserve.registry.chain). Rows written before this revision are chained here, in id order,
as they are at migration time: the chain vouches for them from now on, not for what happened
to them before (an edit made before the upgrade is not detectable).

Revision ID: 0005_audit_chain
Revises: 0004_fleet_rollouts
Create Date: 2026-12-09
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from swapserve.registry import chain

revision: str = "0005_audit_chain"
down_revision: str | None = "0004_fleet_rollouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_audit = sa.table(
    "audit_log",
    sa.column("id", sa.Integer()), sa.column("at", sa.DateTime(timezone=True)), sa.column("actor", sa.String()),
    sa.column("action", sa.String()), sa.column("model", sa.String()), sa.column("version", sa.Integer()),
    sa.column("before", sa.JSON()), sa.column("after", sa.JSON()), sa.column("reason", sa.Text()),
    sa.column("prev_hash", sa.String()), sa.column("hash", sa.String()),
)


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("prev_hash", sa.String(64), nullable=True))
    op.add_column("audit_log", sa.Column("hash", sa.String(64), nullable=True))
    conn = op.get_bind()
    prev = chain.GENESIS
    rows = conn.execute(sa.select(_audit.c.id, _audit.c.at, _audit.c.actor, _audit.c.action, _audit.c.model,
                                  _audit.c.version, _audit.c.before, _audit.c.after, _audit.c.reason)
                        .order_by(_audit.c.id)).all()
    for r in rows:
        digest = chain.link(prev, chain.entry_fields(id=r.id, at=r.at, actor=r.actor, action=r.action,
                                                     model=r.model, version=r.version, before=r.before,
                                                     after=r.after, reason=r.reason))
        conn.execute(_audit.update().where(_audit.c.id == r.id).values(prev_hash=prev, hash=digest))
        prev = digest


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
