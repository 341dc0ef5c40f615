"""Webhook signing secrets encrypted at rest (Fernet, app.crypto) instead of stored in the clear.

The columns become TEXT (a Fernet token of a 50-character secret is ~140 characters) and every
existing secret is encrypted with the first key of MODELPRESS_ENCRYPTION_KEYS, so the API and
workers must be given the same keys as this migration. Downgrade decrypts them back.

Revision ID: 5c1e0a7d9b42
Revises: 08c8e55424ba
Create Date: 2026-11-29 07:40:00.000000

"""
from typing import Callable, Sequence, Union

from alembic import op
import sqlalchemy as sa

from app.crypto import decrypt, encrypt


# revision identifiers, used by Alembic.
revision: str = '5c1e0a7d9b42'
down_revision: Union[str, Sequence[str], None] = '08c8e55424ba'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _convert(convert: Callable[[str], str]) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, secret, previous_secret FROM webhook_endpoints")).all()
    for endpoint_id, secret, previous in rows:
        connection.execute(
            sa.text("UPDATE webhook_endpoints SET secret = :secret, previous_secret = :previous WHERE id = :id"),
            {
                "id": endpoint_id,
                "secret": convert(secret),
                "previous": convert(previous) if previous is not None else None,
            },
        )


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.alter_column('secret', type_=sa.Text(), existing_type=sa.String(length=100), existing_nullable=False)
        batch.alter_column('previous_secret', type_=sa.Text(), existing_type=sa.String(length=100), existing_nullable=True)
    _convert(encrypt)


def downgrade() -> None:
    """Downgrade schema."""
    _convert(decrypt)
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.alter_column('secret', type_=sa.String(length=100), existing_type=sa.Text(), existing_nullable=False)
        batch.alter_column('previous_secret', type_=sa.String(length=100), existing_type=sa.Text(), existing_nullable=True)
