import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_itm_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_itm

    return make_tiny_itm(tmp_path_factory.mktemp("tiny-itm") / "model")


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_captioner

    return make_tiny_captioner(tmp_path_factory.mktemp("tiny-cap") / "model")


POSTGRES_ENV = "BLIP2_SEARCH_TEST_POSTGRES_URL"
"""A PostgreSQL URL whose role may create databases; the metadata tests then run there too."""
METADATA_BACKENDS = ["sqlite", *(["postgresql"] if os.environ.get(POSTGRES_ENV) else [])]


@pytest.fixture()
def postgres_url():
    """A fresh, empty PostgreSQL database for one test (dropped after it); skips when unconfigured."""
    import time
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ProgrammingError

    admin = os.environ.get(POSTGRES_ENV)
    if not admin:
        pytest.skip(f"set {POSTGRES_ENV} to a PostgreSQL URL to run the metadata tests on PostgreSQL")
    name = f"blip2_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    for attempt in range(20):  # CREATE DATABASE fails while another session copies template1 at once
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
            break
        except ProgrammingError as error:
            if "being accessed by other users" not in str(error) or attempt == 19:
                raise
            time.sleep(0.2)
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


@pytest.fixture(params=METADATA_BACKENDS)
def metadata_location(request, tmp_path) -> str:
    """Where a test's metadata store lives: a SQLite file, and a PostgreSQL database when configured."""
    if request.param == "sqlite":
        return str(tmp_path / "lib" / "metadata.sqlite")
    return request.getfixturevalue("postgres_url")
