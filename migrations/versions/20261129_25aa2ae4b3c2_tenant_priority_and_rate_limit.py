"""Tenants: priority (0-9) and per-key request rate limit overrides (issue 7: keys, tenants, quotas).

Both columns are nullable: null means the operator default (MODELPRESS_DEFAULT_PRIORITY,
MODELPRESS_QUOTA_REQUESTS_PER_MINUTE), like the existing quota columns, so no backfill is needed.

Revision ID: 25aa2ae4b3c2
Revises: 698126196743
Create Date: 2026-11-29 01:03:14

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '25aa2ae4b3c2'
down_revision: Union[str, Sequence[str], None] = '698126196743'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rate_limit_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('priority')
        batch_op.drop_column('rate_limit_per_minute')
