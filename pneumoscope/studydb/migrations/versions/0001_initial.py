"""Study database, version 1 (was migrations/0001_initial.sql). Times are ISO 8601 UTC strings; JSON lists are
stored as TEXT; images as BLOB (SQLite) / bytea (PostgreSQL); probabilities as double precision.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Text, primary_key=True),  # DICOM PatientID, or "hmac-sha256:<hex>" of it when pseudonymising
        sa.Column("pseudonymized", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created", sa.Text, nullable=False),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Text, primary_key=True),  # StudyInstanceUID (its keyed hash when pseudonymising) or a uuid
        sa.Column("patient_id", sa.Text, sa.ForeignKey("patients.id")),
        sa.Column("received", sa.Text, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),  # of the uploaded file's bytes: the same file twice is one study
        sa.Column("format", sa.Text, nullable=False),  # JPEG | PNG | DICOM
        sa.Column("modality", sa.Text),
        sa.Column("manufacturer", sa.Text),
        sa.Column("device_model", sa.Text),
        sa.Column("width", sa.Integer, nullable=False),  # of the original image, px
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("warnings", sa.Text, nullable=False, server_default="[]"),  # reader warnings (JSON list)
        sa.Column("image_png", sa.LargeBinary, nullable=False),  # 8-bit grey viewer copy, longest side <= 1024 px
        sa.UniqueConstraint("sha256", name="studies_sha256_key"),  # duplicates across processes: ON CONFLICT
    )
    op.create_index("studies_patient", "studies", ["patient_id"])
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.Text, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text),
        sa.Column("model_checksum", sa.Text, nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("calibrated_probability", sa.Float),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("threshold_info", sa.Text),  # JSON: how the threshold was chosen (checkpoint's threshold_info)
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("created", sa.Text, nullable=False),
        sa.Column("heatmap_png", sa.LargeBinary),  # Grad-CAM overlay, when one was computed
        sqlite_autoincrement=True,
    )
    op.create_index("predictions_study", "predictions", ["study_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.Text, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("prediction_id", sa.Integer, sa.ForeignKey("predictions.id")),  # the prediction the reviewer saw
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
        sa.Column("created", sa.Text, nullable=False),
        sa.CheckConstraint("decision IN ('agree', 'disagree')", name="reviews_decision"),
        sqlite_autoincrement=True,
    )
    op.create_index("reviews_study", "reviews", ["study_id"])


def downgrade() -> None:
    for t in ("reviews", "predictions", "studies", "patients"):
        op.drop_table(t)
