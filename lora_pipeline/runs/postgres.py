"""Postgres for the cluster profile: the Dagster instance's database (URL in $LORA_PIPELINE_DAGSTER_PG_URL),
checked before a process uses it so that an unreachable server is one line, and databases made and dropped
(the tests give every run its own)."""

from __future__ import annotations

from urllib.parse import urlsplit

from lora_pipeline.core.errors import UserError, one_line
from lora_pipeline.core.settings import settings


def libpq_url(url: str) -> str:
    """`url` without a SQLAlchemy driver suffix (postgresql+psycopg2:// -> postgresql://), as libpq reads it."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+')[0]}{sep}{rest}"


def sqlalchemy_url(url: str) -> str:
    """`url` for SQLAlchemy with the psycopg2 driver: dagster-postgres needs it (SQLAlchemy 2.1 would pick
    psycopg 3 for a bare postgresql://, whose server-side parameters break dagster-postgres's NOTIFY)."""
    return "postgresql+psycopg2://" + libpq_url(url).partition("://")[2]


def url_problem(url: str) -> str | None:
    """None for a Postgres URL (`postgresql[+driver]://[user@]host[:port][/database]`); else one line why not."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"not a Postgres URL: {url!r} ({one_line(exc)})"
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres") or not parts.hostname:
        return f"not a Postgres URL: {url!r} (expected postgresql://[user@]host[:port]/database)"
    return None


def postgres_problem(url: str) -> str | None:
    """None when the Postgres database at `url` answers; else one line saying why not."""
    import psycopg2

    if problem := url_problem(url):
        return problem
    try:
        psycopg2.connect(libpq_url(url), connect_timeout=3).close()
    except psycopg2.Error as exc:  # OperationalError: no answer; ProgrammingError: a parameter libpq refuses
        parts = urlsplit(url)
        return f"Postgres at {parts.hostname}:{parts.port or 5432}{parts.path} is unreachable: {one_line(exc)}"
    return None


def require_postgres(url: str) -> None:
    if problem := postgres_problem(url):
        raise UserError(problem)


def _admin(server_url: str, statement: str) -> None:
    import psycopg2

    conn = psycopg2.connect(f"{libpq_url(server_url)}/postgres", connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def create_database(server_url: str, name: str) -> str:
    """Create database `name` (a plain identifier) on the server; return its SQLAlchemy URL."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a plain database name: {name!r}")
    _admin(server_url, f'CREATE DATABASE "{name}"')
    return sqlalchemy_url(f"{server_url}/{name}")


def drop_database(server_url: str, name: str) -> None:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a plain database name: {name!r}")
    _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def require_instance_database() -> None:
    """One line (UserError) when the cluster profile's instance database ($LORA_PIPELINE_DAGSTER_PG_URL) does not
    answer; nothing when the variable is unset (the embedded SQLite instance)."""
    if url := settings().dagster_pg_url:
        require_postgres(url)
