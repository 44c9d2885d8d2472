"""Alembic environment of the swapserve registry.

Two ways in:

* programmatic (``Registry`` on open): the caller passes an open connection, inside a
  transaction, as ``config.attributes["connection"]``; we migrate on it and never touch
  logging (the server owns its logging configuration);
* the Alembic CLI (``alembic -c src/swapserve/registry/alembic.ini ...``): the URL comes
  from ``sqlalchemy.url``, else ``$SWAPSERVE_REGISTRY_URL``, else the default SQLite file.
"""
from __future__ import annotations

import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from swapserve.registry.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER needs batch mode
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("SWAPSERVE_REGISTRY_URL")
    if url:
        return url
    from swapserve.registry.store import Registry

    return Registry.default_url()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()
