"""deliveries: series another receiver is still receiving

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 00:33:04.563352
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('deliveries',
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('receiver', sa.String(length=128), nullable=False),
    sa.Column('until', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('series_uid', 'receiver')
    )


def downgrade() -> None:
    op.drop_table('deliveries')
