"""Version 2: ``studies.filename``, the uploaded file's (sanitised) name, so the viewer's list tells rows apart.
NULL for studies stored before, and when the service pseudonymises (a file name can carry a patient's name).

Revision ID: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("filename", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.drop_column("filename")
