"""The sanitizer: URLs lose their secrets, driver errors keep only what identifies the failure."""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError

from oauthmig.config import parse_database_url, redact_url, settings_from_mapping
from oauthmig.db import describe_error, make_engine
from oauthmig.redact import (
    describe_db_error,
    is_secret_uri_param,
    mask_uri,
    mask_uris_in_text,
    mask_url,
    scrub_log_records,
    scrub_text,
    url_secrets,
)
from tests.helpers.databases import DatabaseFactory

SECRET = "TokSecretValueqzxw"
HEX_TOKEN = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://u:pw1@h:5432/db?password=pw2&sslpassword=pw3",
            "postgresql+psycopg://u:***@h:5432/db?password=***&sslpassword=***",
        ),
        (
            "postgresql+psycopg://u@h/db?passfile=/home/u/.pgpass&sslkey=/k.pem&sslmode=require",
            "postgresql+psycopg://u@h/db?passfile=***&sslkey=***&sslmode=require",
        ),
        (
            "postgresql+psycopg://u@h/db?PASSWORD=x&api_token=y&application_name=app",
            "postgresql+psycopg://u@h/db?PASSWORD=***&api_token=***&application_name=app",
        ),
        ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
        ("sqlite:////tmp/x.sqlite3", "sqlite:////tmp/x.sqlite3"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert redact_url(parse_database_url(url, "k")) == shown


def test_mask_url_repeated_parameter_and_unparseable() -> None:
    url = "postgresql+psycopg://u@h/db?password=a1&password=b2"
    assert mask_url(url) == "postgresql+psycopg://u@h/db?password=***&password=***"
    assert mask_url("not a url") == "<redacted>"


def test_url_secrets_raw_and_encoded() -> None:
    found = url_secrets("postgresql+psycopg://u:p%40ss@h/db?password=q%26r&sslmode=require")
    assert {"p@ss", "p%40ss", "q&r", "q%26r"} <= set(found)
    assert "require" not in found
    assert url_secrets(None) == ()


def test_config_display_url_masks_query_secrets() -> None:
    settings = settings_from_mapping(
        {"databases": {"main": {"url": "postgresql://u:pw1@h/db?password=pw2&sslpassword=pw3"}}},
        {},
        "t",
    )
    db = settings.databases["main"]
    assert db.display_url == "postgresql+psycopg://u:***@h/db?password=***&sslpassword=***"
    assert "pw1" not in repr(db) and "pw2" not in repr(db)


# --------------------------------------------------------------------------- real drivers


@pytest.fixture
def engine(make_database: DatabaseFactory) -> Iterator[Engine]:
    settings = settings_from_mapping({"databases": {"t": {"url": make_database("t")}}}, {}, "t")
    eng = make_engine(settings.databases["t"], settings, create=True)
    with eng.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE tok (id INTEGER PRIMARY KEY, token TEXT, "
                "CONSTRAINT tok_ck CHECK (token <> 'forbidden'))"
            )
        )
        conn.execute(text("CREATE UNIQUE INDEX tok_token_uq ON tok (token)"))
        conn.execute(text("INSERT INTO tok VALUES (1, :t)"), {"t": SECRET})
    yield eng
    eng.dispose()


def _error(eng: Engine, sql: str, **params: object) -> DBAPIError:
    with eng.connect() as conn, pytest.raises(DBAPIError) as info:
        conn.execute(text(sql), params)
    return info.value


def test_unique_violation_keeps_names_not_key_values(engine: Engine) -> None:
    exc = _error(engine, "INSERT INTO tok VALUES (2, :t)", t=SECRET)
    assert SECRET in str(exc)  # the raw text does carry it (DETAIL / parameters)
    message = describe_db_error(exc)
    assert SECRET not in message and "[parameters" not in message and "INSERT" not in message
    if engine.dialect.name == "postgresql":
        assert message.startswith('duplicate key value violates unique constraint "tok_token_uq"')
        assert "SQLSTATE 23505 UniqueViolation" in message and 'table "tok"' in message
    else:
        assert message == "UNIQUE constraint failed: tok.token (SQLITE_CONSTRAINT_UNIQUE)"


def test_check_violation_drops_the_row_image(engine: Engine) -> None:
    exc = _error(engine, "UPDATE tok SET token = 'forbidden' WHERE id = 1")
    message = describe_db_error(exc)
    if engine.dialect.name == "postgresql":
        assert "Failing row" in str(exc.orig)
        assert message == (
            'new row for relation "tok" violates check constraint "tok_ck" '
            "(SQLSTATE 23514 CheckViolation)"
        )
    else:
        assert message.startswith("CHECK constraint failed")


def test_sqlite_trigger_message_is_withheld(backend: str, engine: Engine) -> None:
    if backend == "postgresql":
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE FUNCTION tok_raise() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "RAISE EXCEPTION 'row % token %', NEW, NEW.token USING DETAIL = NEW.token; "
                    "END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER tok_raise BEFORE UPDATE ON tok FOR EACH ROW "
                    "EXECUTE FUNCTION tok_raise()"
                )
            )
    else:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TRIGGER tok_raise BEFORE UPDATE ON tok "
                    f"BEGIN SELECT RAISE(ABORT, 'row {SECRET}'); END"
                )
            )
    exc = _error(engine, "UPDATE tok SET token = token || 'x'")
    assert SECRET in str(exc.orig)
    message = describe_db_error(exc)
    assert SECRET not in message
    if backend == "postgresql":
        assert message.startswith("error raised in function tok_raise")
        assert "SQLSTATE P0001 RaiseException" in message
    else:
        assert "SQLITE_CONSTRAINT_TRIGGER" in message


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_raise_with_an_integrity_sqlstate_is_still_withheld(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION tok_fake() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION USING ERRCODE = '23514', "
                "MESSAGE = 'violates check constraint \"' || NEW.token || '\"'; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER tok_fake BEFORE UPDATE ON tok FOR EACH ROW "
                "EXECUTE FUNCTION tok_fake()"
            )
        )
    message = describe_db_error(_error(engine, "UPDATE tok SET id = 5"))
    assert SECRET not in message and "tok_fake" in message and "23514" in message


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("sql", "kept"),
    [
        (f"SELECT '{SECRET}'::uuid", 'invalid input syntax for type uuid: "<redacted>"'),
        (f"SELECT '{SECRET}'::integer", 'invalid input syntax for type integer: "<redacted>"'),
        (f"SELEC '{SECRET}'", "syntax error at or near"),
        (f"SELECT * FROM nope WHERE x = '{SECRET}'", 'relation "nope" does not exist'),
    ],
)
def test_quoted_values_and_query_text_are_withheld(engine: Engine, sql: str, kept: str) -> None:
    exc = _error(engine, sql)
    message = describe_db_error(exc)
    assert kept in message
    assert SECRET not in message and "LINE" not in message and "SELECT" not in message


def test_describe_error_removes_url_secrets() -> None:
    settings = settings_from_mapping(
        {"databases": {"m": {"url": "postgresql://u:Pw1zzzz@127.0.0.1:1/db?password=Pw2qqqq"}}},
        {},
        "t",
    )
    db = settings.databases["m"]
    exc = psycopg.OperationalError("connection failed for password=Pw2qqqq user Pw1zzzz")
    message = describe_error(exc, db)
    assert "Pw1zzzz" not in message and "Pw2qqqq" not in message


# --------------------------------------------------------------------------- free text


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        (
            'new row for relation "sentry_apitoken" violates check constraint "no_family" '
            f"DETAIL: Failing row contains (3, 1, 1, {HEX_TOKEN}, null).",
            'new row for relation "sentry_apitoken" violates check constraint "no_family"',
        ),
        (
            "(psycopg.errors.X) boom [SQL: UPDATE t SET a = %(a)s] "
            f"[parameters: {{'a': '{SECRET}'}}]",
            "(psycopg.errors.X) boom",
        ),
        (f"bad row (3,1,1,{SECRET},x)", "bad row (<redacted>)"),
        (f"token {HEX_TOKEN} is bad", "token <redacted> is bad"),
        (f'value "{SECRET} and more" too long', 'value "<redacted>" too long'),
        ("database 'main': locked by pid 12 (active, AccessExclusiveLock, open 3s)", None),
        ("conninfo host=h password='a b c' dbname=x", "conninfo host=h password=*** dbname=x"),
    ],
)
def test_scrub_text(raw: str, safe: str | None) -> None:
    assert scrub_text(raw) == (raw if safe is None else safe)


@given(st.text(alphabet=st.sampled_from(list("ab1 2'\"(),.:;=_-x")), max_size=400) | st.text())
def test_scrub_text_is_idempotent(raw: str) -> None:
    once = scrub_text(raw)
    assert scrub_text(once) == once
    assert len(once) <= 300 and "\n" not in once


def test_log_records_are_scrubbed() -> None:
    scrub_log_records()
    logger = logging.getLogger("oauthmig.test_redact")
    logger.propagate = True
    try:
        raise sqlite3.IntegrityError(f"x DETAIL: Failing row contains ({SECRET}, 1, 2, 3)")
    except sqlite3.IntegrityError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "rollback failed on %s", ("conn",), None
        )
        record.exc_info = sys.exc_info()
    assert logging.lastResort is not None
    for f in logging.lastResort.filters:
        assert isinstance(f, logging.Filter)
        f.filter(record)
    assert record.getMessage() == "rollback failed on conn: x"
    assert SECRET not in record.getMessage()
    assert record.exc_info is None and record.exc_text is None


# --- mask_uri: the one masking rule for every URI shown, stored or exported (issue 22) -------

MARK = "Zqx9MarkerSecret"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:pw@app.example.com/cb", "https://***@app.example.com/cb"),
        ("https://user@app.example.com/cb", "https://***@app.example.com/cb"),
        ("https://@app.example.com/cb", "https://@app.example.com/cb"),
        ("https://a:b@c@app.example.com/cb", "https://***@app.example.com/cb"),
        ("https://u:p/w@app.example.com/cb", "https://***@app.example.com/cb"),
        ("https://u:p#w@app.example.com/cb", "https://***@app.example.com/cb"),
        ("//u:p@app.example.com/cb", "//***@app.example.com/cb"),
        (" https://u:p@app.example.com/cb", " https://***@app.example.com/cb"),
        ("https://app.example.com/users/@me/cb", "https://app.example.com/users/@me/cb"),
        (
            "https://app.example.com/cb?email=a@b.example",
            "https://app.example.com/cb?email=a@b.example",
        ),
        (
            "https://app.example.com/cb?client_secret=s&state=x#access_token=t&tt=b",
            "https://app.example.com/cb?client_secret=***&state=x#access_token=***&tt=b",
        ),
        ("https://app.example.com/cb?token=ab#frag", "https://app.example.com/cb?token=***#frag"),
        (
            "https://app.example.com/cb?CLIENT%5FSECRET=x",
            "https://app.example.com/cb?CLIENT%5FSECRET=***",
        ),
        ("https://app.example.com/cb?a=1;code=x", "https://app.example.com/cb?a=1;code=***"),
        (
            "https://app.example.com/cb#/done?id_token=x",
            "https://app.example.com/cb#/done?id_token=***",
        ),
        ("com.example.app:/cb?refresh_token=x", "com.example.app:/cb?refresh_token=***"),
        (
            "https://app.example.com/cb?next=https%3A%2F%2Fu%3Ap%40evil.example%2F&x=1",
            "https://app.example.com/cb?next=***&x=1",
        ),
        (
            "https://app.example.com/cb?next=https://u:p@evil/",
            "https://app.example.com/cb?next=***",
        ),
        (
            "https://app.example.com/cb?next=https%3A%2F%2Fok.example%2F",
            "https://app.example.com/cb?next=https%3A%2F%2Fok.example%2F",
        ),
        ("postgresql://oauth:pa@ssSECRET@db/x", "postgresql://***@db/x"),
        (
            "postgresql+psycopg://o:a:b%c#d/e?f@db:5432/x?sslmode=require",
            "postgresql+psycopg://***@db:5432/x?sslmode=require",
        ),
        (
            "postgresql://o@db/x?password=p#q&sslmode=require",
            "postgresql://***@db/x?password=***&sslmode=require",
        ),
        # Found by hypothesis: an '@' in a secret value after host:port. Over-masked, no leak.
        ("http://127.0.0.1:8080/?client_secret=@Zq", "http://***"),
        ("https://app.example.com/?token=", "https://app.example.com/?token="),
        ("not a uri", "not a uri"),
        ("", ""),
    ],
)
def test_mask_uri(uri: str, shown: str) -> None:
    assert mask_uri(uri) == shown
    assert mask_uri(shown) == shown  # idempotent


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://oauth:pa@ssSECRET@db.internal/x", "postgresql://oauth:***@db.internal/x"),
        ("postgresql://oauth:a:b%2F@db/x", "postgresql://oauth:***@db/x"),
        ("postgresql://oauth:p/w#x?y@db:5433/x", "postgresql://oauth:***@db:5433/x"),
        ("postgresql://oauth@db/x", "postgresql://oauth@db/x"),
    ],
)
def test_database_urls_keep_the_user_name(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert mask_url(make_url(url)) == shown
    parsed = parse_database_url(url, "k")  # adds the +psycopg driver
    assert redact_url(parsed) == shown.replace("postgresql:", "postgresql+psycopg:")


def test_url_secrets_cover_a_password_split_by_at() -> None:
    """SQLAlchemy reads 'oauth:pa@ssSECRET@db' as password 'pa' and host 'ssSECRET@db': the
    driver's 'could not translate host name' error quotes the tail, which must go too."""
    url = "postgresql://oauth:pa@ssSECRET@db.internal/x"
    found = url_secrets(url)
    assert "pa@ssSECRET" in found
    assert "ssSECRET" in found
    text = 'could not translate host name "ssSECRET@db.internal" to address'
    assert "ssSECRET" not in scrub_text(text, found)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("client_secret", True),
        ("Client-Secret", True),
        ("clientSecret", True),
        ("client%5Fsecret", True),
        ("client%255Fsecret", True),
        ("access_token", True),
        ("id_token", True),
        ("code", True),
        ("CODE", True),
        ("api_key", True),
        ("apikey", True),
        ("X-Api-Key", True),
        ("X-Amz-Signature", True),
        ("password", True),
        ("assertion", True),
        ("state", False),
        ("token_type", False),
        ("expires_in", False),
        ("code_challenge_method", False),
        ("monkey", False),
        ("", False),
    ],
)
def test_is_secret_uri_param(name: str, secret: bool) -> None:
    assert is_secret_uri_param(name) is secret


_USERINFO_SAFE = st.text(
    alphabet=st.sampled_from("abcXYZ019-._~!$&'()*+,;=:%@"), min_size=0, max_size=12
)
_NO_AT = st.text(alphabet=st.sampled_from("abcXYZ019-._~!$'()*+,=:%/?#"), max_size=12)
_HOSTS = st.sampled_from(["app.example.com", "127.0.0.1:8080", "[::1]", "db.internal:5432"])
_TAILS = st.sampled_from(["", "/", "/cb", "/cb?x=1", "/a/b?state=s#f", "?q", "#frag"])


@given(
    scheme=st.sampled_from(["https", "http", "com.example.app", "wss"]),
    before=_USERINFO_SAFE,
    after=_USERINFO_SAFE,
    host=_HOSTS,
    tail=_TAILS,
)
def test_marker_never_survives_in_userinfo(
    scheme: str, before: str, after: str, host: str, tail: str
) -> None:
    """Any user:password made of userinfo characters, '@' and '%' included."""
    uri = f"{scheme}://{before}{MARK}{after}@{host}{tail}"
    assert MARK not in mask_uri(uri)
    if ":" in before:
        assert MARK not in mask_uri(uri, keep_user=True)


@given(
    user=st.text(alphabet=st.sampled_from("abc019_"), max_size=6),
    before=_NO_AT,
    after=_NO_AT,
    host=_HOSTS,
    tail=_TAILS,
)
def test_marker_never_survives_in_a_password_with_delimiters(
    user: str, before: str, after: str, host: str, tail: str
) -> None:
    """A password holding '/', '?', '#', ':' or '%' (no '@'), any scheme."""
    for scheme in ("https", "postgresql+psycopg"):
        uri = f"{scheme}://{user}:{before}{MARK}{after}@{host}{tail}"
        assert MARK not in mask_uri(uri), uri
        assert MARK not in mask_uri(uri, keep_user=True), uri


@given(
    password=st.text(alphabet=st.characters(codec="ascii", exclude_characters="\x00"), max_size=16),
    host=_HOSTS,
    tail=st.sampled_from(["", "/x", "/x?sslmode=require", "/x?application_name=a"]),
)
def test_marker_never_survives_in_any_database_password(
    password: str, host: str, tail: str
) -> None:
    """Database URLs: any printable password, '@' '/' '?' '#' included."""
    url = f"postgresql://oauth:{password}{MARK}{password}@{host}{tail}"
    assert MARK not in mask_url(url)
    assert MARK not in mask_uri(url)


_PARAM_NAMES = st.sampled_from(
    ["client_secret", "access_token", "refresh_token", "id_token", "password", "passwd", "pwd",
     "secret", "token", "code", "api_key", "apikey", "key", "assertion", "Client%5FSecret",
     "ACCESS_TOKEN", "X-Api-Key"]
)  # fmt: skip
_VALUE_CHARS = st.text(alphabet=st.sampled_from("abcXYZ019-._~%!$'()*+,;=:@/?"), max_size=8)


@given(
    base=st.sampled_from(
        ["https://app.example.com/cb", "com.example.app:/cb", "http://127.0.0.1:8080/", "x"]
    ),
    where=st.sampled_from(["?", "?a=1&", "?a=1;", "#", "#a=1&", "#/route?", "?s=1#"]),
    name=_PARAM_NAMES,
    before=_VALUE_CHARS,
    after=_VALUE_CHARS,
    rest=st.sampled_from(["", "&state=x", "&b=2#f"]),
    encode=st.booleans(),
)
def test_marker_never_survives_in_a_secret_parameter(
    base: str, where: str, name: str, before: str, after: str, rest: str, encode: bool
) -> None:
    value = f"{before}{MARK}{after}"
    if encode:
        value = quote(value, safe="")
    uri = f"{base}{where}{name}={value}{rest}"
    assert MARK not in mask_uri(uri), uri


@given(
    inner=st.sampled_from(
        [f"https://u:{MARK}@evil.example/", f"https://evil.example/?token={MARK}"]
    ),
    times=st.integers(min_value=0, max_value=2),
)
def test_marker_never_survives_in_a_nested_uri(inner: str, times: int) -> None:
    value = inner
    for _ in range(times):
        value = quote(value, safe="")
    uri = f"https://app.example.com/cb?next={value}&x=1"
    assert MARK not in mask_uri(uri), uri
    assert mask_uri(uri).endswith("&x=1")


@given(st.text(max_size=80))
def test_mask_uri_never_raises(text_: str) -> None:
    assert isinstance(mask_uri(text_), str)
    assert isinstance(mask_uris_in_text(text_), str)


def test_mask_uris_in_text_masks_each_uri_of_a_message() -> None:
    message = (
        "normalized form is https://u:p@app.example.com/cb?token=t; "
        "a browser would go to https://x:y@xn--bcher-kva.example/cb"
    )
    shown = mask_uris_in_text(message)
    assert "u:p" not in shown and "x:y" not in shown and "token=t" not in shown
    assert "https://***@app.example.com/cb?token=***" in shown
