"""Version 3: ``predictions.label_from``, the probability the label compares with the threshold (``Prediction``'s
field: ``probability`` or ``calibrated_probability``), stored so the report and the worklist read it instead of
re-deriving it. Rows stored before get what the predictor chose then: the calibrated probability when there is one.

Revision ID: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("label_from", sa.Text))
    op.execute("UPDATE predictions SET label_from = CASE WHEN calibrated_probability IS NULL THEN 'probability' "
               "ELSE 'calibrated_probability' END")


def downgrade() -> None:
    with op.batch_alter_table("predictions") as b:
        b.drop_column("label_from")
