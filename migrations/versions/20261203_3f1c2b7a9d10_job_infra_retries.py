"""Jobs: infra_retries, the attempts released because the database, broker or storage was unreachable.

Such attempts are retried without counting against MODELPRESS_MAX_ATTEMPTS (the user's budget); this
column keeps them apart from ``attempts`` (which numbers every claim and so names each attempt's
artifact prefix) and caps them with MODELPRESS_MAX_INFRA_RETRIES. Existing jobs start at 0.

Revision ID: 3f1c2b7a9d10
Revises: 5c1e0a7d9b42
Create Date: 2026-12-03 13:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '3f1c2b7a9d10'
down_revision: Union[str, Sequence[str], None] = '5c1e0a7d9b42'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('infra_retries', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('infra_retries')
