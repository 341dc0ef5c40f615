"""Outages and liveness: jobs.infra_retries, and worker heartbeats.

``jobs.infra_retries`` counts the attempts released because the database, broker or storage was unreachable.
Such attempts are retried without counting against MODELPRESS_MAX_ATTEMPTS (the user's budget); this column
keeps them apart from ``attempts`` (which numbers every claim and so names each attempt's artifact prefix) and
caps them with MODELPRESS_MAX_INFRA_RETRIES. Existing jobs start at 0.

``worker_heartbeats``: one row per job worker / maintenance process, refreshed while it lives (/readyz reads
them). A new table with no data to carry: nothing to backfill; downgrade drops it.

Revision ID: 3f9a1c2d7e60
Revises: 5c1e0a7d9b42
Create Date: 2026-12-03 13:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '3f9a1c2d7e60'
down_revision: Union[str, Sequence[str], None] = '5c1e0a7d9b42'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('infra_retries', sa.Integer(), server_default='0', nullable=False))
    op.create_table('worker_heartbeats',
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('hostname', name=op.f('pk_worker_heartbeats'))
    )
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_worker_heartbeats_last_seen'), ['last_seen'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_worker_heartbeats_last_seen'))

    op.drop_table('worker_heartbeats')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('infra_retries')
