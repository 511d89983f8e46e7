"""Alembic environment of the study database, run programmatically by ``pneumoscope.studydb.schema.migrate`` (no
alembic.ini): it hands over an open connection; every revision runs in its own transaction together with its
``alembic_version`` update, so a failed revision leaves the previous version intact (DDL is transactional in
PostgreSQL and, with the BEGIN that schema.py emits itself, in SQLite)."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
