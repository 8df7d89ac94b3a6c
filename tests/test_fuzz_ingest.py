"""Property tests for POST /v1/requests: hostile records and bodies against the real app and store.

Hypothesis writes the JSON text itself, so a body can carry what a JSON library would never
produce: duplicate keys, invalid UTF-8, lone surrogate escapes, numbers past every range, a BOM,
deep nesting. Each generated value knows what the contract says about it (valid and stored as
what, a validation error, or not JSON at all); :func:`predict` turns a body into the answer the
exporter must give and the rows ClickHouse must then hold, and the test compares both with reality.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exporter.app import runtime

from .conftest import flush
from .record_model import (
    MAX_EPOCH_S,
    MIN_EPOCH_S,
    Expected,
    assert_stored_exactly,
    derive_endpoint,
    first_of_each_request_id,
    stored_rows,
)

MAX_CHARS = 1024
MAX_REQUEST_ID = 128
MAX_TOKENS = 2**32 - 1
MAX_RESPONSE_MS = 86_400_000
REQUIRED = ("timestamp", "org", "model", "status_code")
NDJSON_TYPES = ["application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"]
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Value:
    """A JSON value as sent, and what the contract makes of it.

    ``verdict`` is ``ok`` (``value`` is what is stored), ``invalid`` (a validation error) or
    ``broken`` (not valid JSON: invalid UTF-8 in a kept string, a lone surrogate, nesting too deep).
    ``poisons_array``: inside a JSON array body the whole body is unreadable, not just this record.
    """

    text: bytes
    verdict: str
    value: Any = None
    poisons_array: bool = False


def dumps(value: Any, ascii_only: bool = False) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


def ok(value: Any) -> Value:
    return Value(dumps(value), "ok", value)


def invalid(value: Any) -> Value:
    return Value(dumps(value), "invalid")


def raw(text: bytes, verdict: str, value: Any = None) -> Value:
    return Value(text, verdict, value)


def mostly(valid: st.SearchStrategy[Value], *rare: st.SearchStrategy[Value]) -> st.SearchStrategy[Value]:
    """Valid values 19 times in 20, so that half the records or more pass and rows get stored."""
    if not rare:
        return valid
    return st.sampled_from([True] * 19 + [False]).flatmap(lambda good: valid if good else st.one_of(*rare))


# --- values, field by field --------------------------------------------------------------------

CHARS = st.characters(exclude_categories=("Cs",))  # NUL, controls, RTL, emoji: all allowed
WRONG_TYPES = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
BAD_UTF8 = [b'"\xff"', b'"a\xc3"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"ok\xf8\x88\x80\x80\x80"']
LONE_SURROGATES = [b'"\\ud800"', b'"x\\udfff"', b'"\\udc00\\ud800"']


def strings(max_len: int, min_len: int = 0) -> st.SearchStrategy[Value]:
    def at_length(char: str, extra: int) -> Value:
        text = char * (max_len + extra)
        return ok(text) if extra <= 0 else invalid(text)

    short = st.builds(lambda s, a: Value(dumps(s, a), "ok", s), st.text(CHARS, min_size=min_len, max_size=24), st.booleans())
    edge = st.builds(at_length, st.sampled_from(["a", "é", "😀", "\x00", "\u202e"]), st.just(0))
    rare = [
        st.builds(at_length, st.sampled_from(["a", "😀"]), st.just(1)),
        WRONG_TYPES.map(invalid),
        st.sampled_from(BAD_UTF8).map(lambda t: raw(t, "broken")),
        st.sampled_from(LONE_SURROGATES).map(lambda t: Value(t, "broken", poisons_array=True)),
    ]
    if min_len:
        rare.append(st.just(invalid("")))
    return mostly(st.one_of(short, edge), *rare)


def integer_text(n: int) -> Value:
    return raw(str(n).encode(), "ok", n)


def integers(low: int, high: int) -> st.SearchStrategy[Value]:
    valid = st.one_of(st.integers(low, high), st.sampled_from([low, high])).map(integer_text)
    out_of_range = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                             st.sampled_from([2**64, 10**30, -(2**63) - 1, 10**400])).map(lambda n: raw(str(n).encode(), "invalid"))
    not_integers = st.sampled_from([b"200.0", b"1e2", b"1E0", b"-0.0", b"true", b'"200"', b"null", b'"NaN"', b"[]"]).map(
        lambda t: raw(t, "invalid"))
    return mostly(valid, out_of_range, not_integers, st.just(raw(b"-0", "ok" if low <= 0 <= high else "invalid", 0)))


def response_times() -> st.SearchStrategy[Value]:
    def number(x: float) -> Value:
        return Value(dumps(x), "ok" if 0 <= x <= MAX_RESPONSE_MS else "invalid", x)

    valid = st.one_of(
        st.floats(0, MAX_RESPONSE_MS).map(number),
        st.integers(0, MAX_RESPONSE_MS).map(lambda n: raw(str(n).encode(), "ok", float(n))),
        st.just(raw(b"null", "ok", None)),
        st.sampled_from([(b"-0.0", -0.0), (b"1e-400", 0.0), (b"8.64e7", 86_400_000.0), (b"0.1e1", 1.0)]).map(lambda p: raw(p[0], "ok", p[1])),
    )
    bad = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not 0 <= x <= MAX_RESPONSE_MS).map(number),
        st.sampled_from([b"1e308", b"1e400", b"-1e400", b"86400000.00001", b'"NaN"', b'"Infinity"', b'"-Infinity"', b'"12"', b"true"]).map(
            lambda t: raw(t, "invalid")),
    )
    return mostly(valid, bad)


def endpoints() -> st.SearchStrategy[Value]:
    valid = st.one_of(st.sampled_from(["completion", "embedding", "other"]).map(ok), st.just(raw(b"null", "ok", None)))
    bad = st.one_of(st.sampled_from(["Completion", "", "chat", "completion "]).map(invalid), st.integers().map(invalid))
    return mostly(valid, bad)


def epoch(text: bytes, seconds: float) -> Value:
    """Epoch seconds are range-checked as they are read; the instant is the double the text names."""
    return raw(text, "ok" if MIN_EPOCH_S <= seconds < MAX_EPOCH_S else "invalid", Fraction(seconds))


@dataclass(frozen=True)
class DateTimeText:
    """An RFC 3339 text: its range is checked only once the whole record is read (a later duplicate wins)."""

    seconds: Fraction


@st.composite
def rfc3339(draw) -> Value:
    local = draw(st.datetimes(datetime(1995, 1, 1), datetime(2105, 1, 1)))
    boundary = draw(st.sampled_from([None, None, None, MIN_EPOCH_S, MAX_EPOCH_S]))
    offset_min = draw(st.integers(-1439, 1439))
    if boundary is not None:  # land within a second of a bound, after the offset
        utc = datetime.fromtimestamp(boundary, timezone.utc).replace(tzinfo=None) + timedelta(microseconds=draw(st.integers(-10**6, 10**6)))
        local = utc + timedelta(minutes=offset_min)
    digits = draw(st.integers(0, 9))
    # Up to nine fraction digits: the microseconds, then digits finer than any clock keeps.
    fine = f"{draw(st.integers(0, 999)):03d}"
    fraction = (f"{local.microsecond:06d}" + fine)[:digits]
    separator = draw(st.sampled_from(["T", "t", " "]))
    if offset_min == 0 and draw(st.booleans()):
        zone = draw(st.sampled_from(["Z", "z"]))
    else:
        zone = f"{'+' if offset_min >= 0 else '-'}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    text = f"{local:%Y-%m-%d}{separator}{local:%H:%M:%S}{'.' if digits else ''}{fraction}{zone}"
    whole = (local.replace(microsecond=0) - datetime(1970, 1, 1)) // timedelta(seconds=1)
    sent = Fraction(whole) + (Fraction(int(fraction), 10**digits) if digits else 0) - offset_min * 60
    return Value(dumps(text), "ok", DateTimeText(sent))


def timestamps() -> st.SearchStrategy[Value]:
    valid = st.one_of(
        rfc3339(),
        st.integers(MIN_EPOCH_S, MAX_EPOCH_S - 1).map(lambda n: epoch(str(n).encode(), n)),
        # Milliseconds as a decimal fraction, and plain doubles.
        st.integers(MIN_EPOCH_S * 1000 - 3, MAX_EPOCH_S * 1000 + 3).map(lambda ms: epoch(repr(ms / 1000).encode(), ms / 1000)),
        st.floats(MIN_EPOCH_S - 1, MAX_EPOCH_S + 1).map(lambda x: epoch(repr(x).encode(), x)),
    )
    bad = st.one_of(
        st.sampled_from([MIN_EPOCH_S - 1, MAX_EPOCH_S, -5, 0, 10**30]).map(lambda n: epoch(str(n).encode(), float(n))),
        st.sampled_from([b"1e308", b"-1e308", b"1e400", b"true", b"null", b"[]"]).map(lambda t: raw(t, "invalid")),
        st.sampled_from(["2026-11-24T10:15:30", "2026-11-24", "yesterday", "", "NaN", "2026-02-30T00:00:00Z",
                         "2026-11-24T24:00:00Z", "2026-11-24T23:59:60Z", "2026-11-24T10:15Z", " 2026-11-24T10:15:30Z"]).map(invalid),
    )
    return mostly(valid, bad)


FIELDS: dict[str, Callable[[], st.SearchStrategy[Value]]] = {
    "timestamp": timestamps,
    "org": lambda: strings(MAX_CHARS, min_len=1),
    "model": lambda: strings(MAX_CHARS),
    "status_code": lambda: integers(100, 599),
    "path": lambda: strings(MAX_CHARS),
    "endpoint": endpoints,
    "method": lambda: strings(MAX_CHARS),
    "response_time_ms": response_times,
    "input_tokens": lambda: integers(0, MAX_TOKENS),
    "output_tokens": lambda: integers(0, MAX_TOKENS),
    "token_name": lambda: strings(MAX_CHARS),
    "token_owner": lambda: strings(MAX_CHARS),
    "service_account": lambda: strings(MAX_CHARS),
    "team": lambda: strings(MAX_CHARS),
    "user_id": lambda: strings(MAX_CHARS),
    "request_id": lambda: strings(MAX_REQUEST_ID),
}
FIELD_VALUES = {name: make() for name, make in FIELDS.items()}

# Unknown fields are ignored unread, except that the JSON around them must still be JSON.
JSON_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=False, allow_infinity=False), st.text(CHARS, max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(CHARS, max_size=4), inner, max_size=3)),
    max_leaves=8,
)
UNKNOWN_VALUES = mostly(
    st.one_of(JSON_JUNK.map(ok), st.sampled_from([40, 400]).map(lambda depth: raw(b"[" * depth + b"]" * depth, "ok"))),
    st.sampled_from(BAD_UTF8).map(lambda t: raw(t, "ok")),  # not a kept string: never decoded
    st.sampled_from(LONE_SURROGATES).map(lambda t: Value(t, "broken", poisons_array=True)),
    st.just(Value(b"[" * 5000 + b"]" * 5000, "broken", poisons_array=True)),  # past the decoder's depth guard
)
UNKNOWN_NAMES = st.one_of(st.text(CHARS, max_size=12).filter(lambda n: n not in FIELDS).map(dumps), st.just(b'"\xff\xfe"'))


@dataclass
class RecordText:
    pairs: list[tuple[bytes, str | None, Value]] = field(default_factory=list)  # (key text, known field, value)

    def render(self, spaced: bool) -> bytes:
        sep = b", " if spaced else b","
        return b"{" + sep.join(key + b":" + value.text for key, _, value in self.pairs) + b"}"


@st.composite
def records(draw) -> RecordText:
    pairs: list[tuple[bytes, str | None, Value]] = []
    for name in FIELDS:
        present = draw(st.sampled_from([True] * 39 + [False])) if name in REQUIRED else draw(st.booleans())
        if present:
            pairs.append((dumps(name), name, draw(FIELD_VALUES[name])))
    for _ in range(draw(st.integers(0, 2))):
        pairs.append((draw(UNKNOWN_NAMES), None, draw(UNKNOWN_VALUES)))
    if pairs and draw(st.sampled_from([False] * 7 + [True])):  # a key given twice
        name = draw(st.sampled_from(list(FIELDS)))
        pairs.append((dumps(name), name, draw(FIELD_VALUES[name])))
    return RecordText(draw(st.permutations(pairs)))


# --- what the contract says about a record and a body -------------------------------------------


@dataclass(frozen=True)
class Verdict:
    kind: str  # ok, invalid, broken
    row: Expected | None = None
    request_id: str = ""
    poisons_array: bool = False


def judge(record: RecordText) -> Verdict:
    """Read the pairs in order as a streaming decoder does: the first problem decides; a repeated key
    must be valid every time and keeps its last value; ranges of date-times are checked at the end."""
    poisons = any(v.poisons_array for _, _, v in record.pairs)
    values: dict[str, Any] = {}
    for _, name, value in record.pairs:
        if value.verdict != "ok":
            return Verdict(value.verdict, poisons_array=poisons)
        if name is not None:
            values[name] = value.value
    if any(name not in values for name in REQUIRED):
        return Verdict("invalid", poisons_array=poisons)
    stamp = values["timestamp"]
    if isinstance(stamp, DateTimeText):
        seconds = stamp.seconds
        micros = Fraction(round(seconds * 10**6), 10**6)  # read with microsecond precision first
        if not MIN_EPOCH_S <= micros < MAX_EPOCH_S:
            return Verdict("invalid", poisons_array=poisons)
    else:
        seconds = stamp
    path = values.get("path", "")
    row = Expected(
        seconds=seconds,
        fields=(
            values["org"], values["model"], values.get("endpoint") or derive_endpoint(path), values["status_code"],
            values.get("response_time_ms"), values.get("input_tokens", 0), values.get("output_tokens", 0),
            path, values.get("method", ""), values.get("token_name", ""), values.get("token_owner", ""),
            values.get("service_account", ""), values.get("team", ""), values.get("user_id", ""), values.get("request_id", ""),
        ),
    )
    return Verdict("ok", row, values.get("request_id", ""), poisons)


JUNK_ITEMS = JSON_JUNK.filter(lambda v: not isinstance(v, dict)).map(ok)  # JSON, but not an object
GARBAGE_LINES = st.builds(lambda first, rest: (first + rest).encode(), st.sampled_from(list("xyzQ}]:,#@!<")),
                          st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=10))


@dataclass
class Body:
    encoding: str  # object, array, ndjson
    data: bytes
    content_type: str | None
    items: list[RecordText | Value | bytes]  # records, non-object JSON values, garbage lines
    bom: bool
    bom_line_alone: bool = False  # NDJSON whose first line is blank: the BOM becomes a line of its own


@st.composite
def bodies(draw) -> Body:
    encoding = draw(st.sampled_from(["object", "array", "ndjson"]))
    bom = draw(st.sampled_from([False] * 19 + [True]))
    lead = draw(st.sampled_from([b"", b"", b" ", b"\n\t "]))
    if encoding == "object":
        items: list[Any] = [draw(records())]
        data = items[0].render(draw(st.booleans()))
        content_type = draw(st.sampled_from([None, "application/json", "application/json; charset=utf-8"]))
    else:
        kinds = st.one_of(records(), records(), records(), JUNK_ITEMS)
        if encoding == "ndjson":
            kinds = st.one_of(kinds, GARBAGE_LINES)
        items = draw(st.lists(kinds, min_size=1, max_size=8))
        texts = [item.render(draw(st.booleans())) if isinstance(item, RecordText) else item.text if isinstance(item, Value) else item
                 for item in items]
        if encoding == "array":
            data = b"[" + b",\n".join(texts) + b"]"
            content_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8"]))
        else:
            lines: list[bytes] = []
            for text in texts:
                lines += [draw(st.sampled_from([b"", b"  ", b"\t"])) for _ in range(draw(st.integers(0, 1)))] + [text]
            data = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines) + draw(st.sampled_from([b"", b"\n"]))
            content_type = draw(st.sampled_from(NDJSON_TYPES))
    data = lead + data
    alone = encoding == "ndjson" and bom and not data.split(b"\n", 1)[0].strip()
    return Body(encoding, (BOM if bom else b"") + data, content_type, items, bom, alone)


@dataclass(frozen=True)
class Prediction:
    status: int
    body_error: bool  # answered {"error": ...} as a whole
    accepted: list[Verdict]
    rejected: list[int]
    records: int = 0


def predict(body: Body) -> Prediction:
    if body.bom and body.encoding != "ndjson":
        return Prediction(400, True, [], [])  # a BOM is not JSON text (RFC 8259 section 8.1)
    verdicts = [Verdict("broken")] if body.bom_line_alone else []
    for position, item in enumerate(body.items):
        if isinstance(item, RecordText):
            verdict = judge(item)
        elif isinstance(item, Value):
            verdict = Verdict("invalid")  # JSON, but not an object
        else:
            verdict = Verdict("broken")
        if position == 0 and body.bom and not body.bom_line_alone:  # the BOM sticks to the first line: not JSON
            verdict = Verdict("broken")
        verdicts.append(verdict)
    if body.encoding == "array" and any(v.poisons_array for v in verdicts):
        return Prediction(400, True, [], [])
    accepted = [v for v in verdicts if v.kind == "ok"]
    rejected = [i for i, v in enumerate(verdicts) if v.kind != "ok"]
    if accepted:
        return Prediction(202, False, accepted, rejected, len(verdicts))
    if body.encoding == "ndjson" and all(v.kind == "broken" for v in verdicts):
        return Prediction(400, True, [], [])
    return Prediction(400, False, [], rejected, len(verdicts))


# --- the properties ---------------------------------------------------------------------------


def reset_store(app) -> None:
    """Each example starts from an empty table and an empty request-id index."""
    store = runtime(app).store
    for table in ("requests", "request_ids"):
        store.writer.command(f"TRUNCATE TABLE {store.database}.{table}")


@pytest.fixture
def fuzz_app(make_app):
    # No retention: timestamps reach back to 2000 and must stay.
    return make_app(clickhouse={"retention_days": 0}, writer={"batch_rows": 100_000})


def post(app, body: Body):
    kwargs: dict[str, Any] = {"data": body.data}
    if body.content_type:
        kwargs["content_type"] = body.content_type
    return app.test_client().post("/v1/requests", **kwargs)


def check_answer(answer, body: Body, expected: Prediction) -> None:
    assert answer.status_code == expected.status, (answer.status_code, answer.json, body.data[:300])
    payload = answer.json
    if expected.body_error:
        assert set(payload) == {"error"} and payload["error"].endswith(".")
        return
    assert set(payload) == {"accepted", "rejected"}
    assert payload["accepted"] == len(expected.accepted)
    assert [r["index"] for r in payload["rejected"]] == expected.rejected
    assert payload["accepted"] + len(payload["rejected"]) == expected.records
    assert all(isinstance(r["error"], str) and r["error"].endswith(".") and "\n" not in r["error"] for r in payload["rejected"])


# An insert into the embedded store costs a few hundred milliseconds (the rollup views), so each
# example sends several bodies and checks the store once.
@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          database=None)
@given(batch=st.lists(bodies(), min_size=1, max_size=6))
def test_every_body_gets_the_contracts_answer_and_exactly_the_accepted_rows_are_stored(fuzz_app, batch):
    app = fuzz_app
    reset_store(app)
    accepted: list[Verdict] = []
    for body in batch:
        expected = predict(body)
        check_answer(post(app, body), body, expected)
        accepted += expected.accepted
        event(f"{body.encoding} answered {expected.status}")

    flush(app)
    rows = first_of_each_request_id((v.request_id, v.row) for v in accepted if v.row is not None)
    assert_stored_exactly(stored_rows(app), rows)
    event(f"rows stored: {min(len(rows), 5)}{'+' if len(rows) >= 5 else ''}")


# --- examples the properties found or must always cover -----------------------------------------

GOOD = b'"timestamp":1795000000,"org":"o","model":"m","status_code":200'


@pytest.mark.parametrize(
    ("data", "content_type", "status", "rejected"),
    [
        # Invalid UTF-8 inside a kept string used to escape as UnicodeDecodeError: a 500.
        (b"{" + GOOD + b',"user_id":"\xff"}', "application/json", 400, [0]),
        (b"[{" + GOOD + b'},{' + GOOD + b',"org":"\xc3"}]', "application/json", 202, [1]),
        (b"{" + GOOD + b'}\n{' + GOOD + b',"team":"\xed\xa0\x80"}\n', "application/x-ndjson", 202, [1]),
        # Nesting past msgspec's depth guard used to escape as RecursionError: a 500.
        (b"{" + GOOD + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}", "application/json", 400, [0]),
        (b"[" * 3000 + b"]" * 3000, "application/json", 400, None),
        (b"{" + GOOD + b'}\n{' + GOOD + b',"x":' + b"{\"a\":" * 3000 + b"1" + b"}" * 3000 + b"}", "application/x-ndjson", 202, [1]),
    ],
)
def test_undecodable_records_are_rejected_not_a_server_error(make_app, data, content_type, status, rejected):
    app = make_app()
    answer = app.test_client().post("/v1/requests", data=data, content_type=content_type)
    assert answer.status_code == status, answer.json
    if rejected is None:
        assert set(answer.json) == {"error"}
    else:
        assert [r["index"] for r in answer.json["rejected"]] == rejected
    flush(app)
    assert len(stored_rows(app)) == answer.json.get("accepted", 0)


def test_a_batch_spanning_a_century_of_months_is_stored_not_retried_forever(make_app):
    """ClickHouse refuses an insert block touching over 100 monthly partitions by default; one such
    acknowledged body used to stall the writer on it forever (and everything queued behind it)."""
    app = make_app(clickhouse={"retention_days": 0})
    months = [{"timestamp": MIN_EPOCH_S + 86400 + i * 2_629_746, "org": "o", "model": "m", "status_code": 200, "request_id": f"m{i}"}
              for i in range(150)]
    assert app.test_client().post("/v1/requests", json=months).json["accepted"] == 150
    rt = runtime(app)
    assert rt.writer.drain(time.monotonic() + 60), rt.writer.status.last_error
    months_sent = {datetime.fromtimestamp(r["timestamp"], timezone.utc).strftime("%Y%m") for r in months}
    assert rt.store.query("SELECT count(), uniqExact(toYYYYMM(timestamp)) FROM requests") == [(150, len(months_sent))]
    assert len(months_sent) > 100  # ClickHouse's default cap per insert block
