"""The PostgreSQL fixtures start a real server that SQLAlchemy can use."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.postgres


def _roundtrip(url: str, table: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        t = sa.Table(table, meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("name", sa.String(50), nullable=False))
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(t.insert(), [{"id": 1, "name": "zone-a"}])
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.select(t.c.id, t.c.name))]
    finally:
        engine.dispose()


def test_pg_url_is_a_real_postgres(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://")
    assert pg_url.endswith("/hvtsm_test")
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.dialect.name == "postgresql"
            assert conn.execute(sa.text("select current_database()")).scalar() == "hvtsm_test"
    finally:
        engine.dispose()
    assert _roundtrip(pg_url, "fixture_probe") == [(1, "zone-a")]


@pytest.mark.parametrize("n", [1, 2])
def test_pg_empty_url_is_fresh_per_test(pg_empty_url: str, n: int) -> None:
    # Both parametrized runs create the same table: the second would fail with a
    # duplicate key (or table) if the databases were shared.
    engine = sa.create_engine(pg_empty_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert _roundtrip(pg_empty_url, "shared_name") == [(1, "zone-a")]
