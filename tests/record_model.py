"""An independent reading of the record contract (CONTRACT.md, ``POST /v1/requests``) for tests:
what a stored row must hold for a record the exporter accepted, and a comparison of ClickHouse's
rows with that expectation. Nothing here imports the exporter's own validation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from fractions import Fraction
from typing import Any

from exporter.app import runtime

MIN_EPOCH_S = 946_684_800  # 2000-01-01T00:00:00Z
MAX_EPOCH_S = 4_102_444_800  # 2100-01-01T00:00:00Z, excluded
STRING_FIELDS = ("path", "method", "token_name", "token_owner", "service_account", "team", "user_id", "request_id")

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2}):(\d{2}))"
)


def rfc3339_seconds(text: str) -> Fraction | None:
    """Epoch seconds of an RFC 3339 date-time with an offset, exactly; ``None`` when it is not one."""
    match = _RFC3339.fullmatch(text)
    if not match:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, sign, off_h, off_m = match.groups()[6:]
    try:
        days = date(year, month, day).toordinal() - date(1970, 1, 1).toordinal()
    except ValueError:
        return None
    if hour > 23 or minute > 59 or second > 59:  # RFC 3339 allows :60; the contract's parser does not
        return None
    offset = 0
    if sign:
        if int(off_h) > 23 or int(off_m) > 59:
            return None
        offset = (int(off_h) * 60 + int(off_m)) * 60 * (1 if sign == "+" else -1)
    seconds = Fraction(days * 86400 + hour * 3600 + minute * 60 + second - offset)
    if fraction:
        seconds += Fraction(int(fraction), 10 ** len(fraction))
    return seconds


def derive_endpoint(path: str) -> str:
    lowered = path.lower()
    if "completion" in lowered:
        return "completion"
    if "embedding" in lowered:
        return "embedding"
    return "other"


@dataclass(frozen=True)
class Expected:
    """A row as it must be stored; ``seconds`` is the exact instant sent (stored to the nearest ms)."""

    seconds: Fraction
    fields: tuple[Any, ...]  # org, model, endpoint, status_code, response_time_ms, tokens, then STRING_FIELDS


def expected_row(record: Mapping[str, Any]) -> Expected:
    """The row for an accepted record (a decoded JSON object; the last value of a repeated key)."""
    stamp = record["timestamp"]
    seconds = rfc3339_seconds(stamp) if isinstance(stamp, str) else Fraction(float(stamp))
    assert seconds is not None, stamp
    path = record.get("path", "")
    endpoint = record.get("endpoint") or derive_endpoint(path)
    response_time = record.get("response_time_ms")
    strings = tuple(record.get(name, "") for name in STRING_FIELDS)
    return Expected(
        seconds=seconds,
        fields=(
            record["org"],
            record["model"],
            endpoint,
            record["status_code"],
            None if response_time is None else float(response_time),
            record.get("input_tokens", 0),
            record.get("output_tokens", 0),
            *strings,
        ),
    )


def first_of_each_request_id(rows: Iterable[tuple[str, Expected]]) -> list[Expected]:
    """Accepted rows in arrival order, a repeated non-empty ``request_id`` counted once (the first)."""
    seen: set[str] = set()
    kept = []
    for request_id, row in rows:
        if request_id:
            if request_id in seen:
                continue
            seen.add(request_id)
        kept.append(row)
    return kept


STORED_COLUMNS = (
    "toUnixTimestamp64Milli(timestamp), org, model, toString(endpoint), status_code, response_time_ms, "
    "input_tokens, output_tokens, " + ", ".join(STRING_FIELDS)
)


def stored_rows(app) -> list[tuple[int, tuple[Any, ...]]]:
    """Every row of ``requests`` as (epoch milliseconds, the fields in :class:`Expected` order)."""
    result = runtime(app).store.reader.query(f"SELECT {STORED_COLUMNS} FROM requests")
    return [(row[0], tuple(row[1:])) for row in result.result_rows]


def assert_stored_exactly(stored: Sequence[tuple[int, tuple[Any, ...]]], expected: Sequence[Expected]) -> None:
    """The same rows (a multiset): every field equal, each timestamp the sent instant to the nearest ms."""
    assert len(stored) == len(expected), f"{len(stored)} rows stored, {len(expected)} expected"
    got = sorted(stored, key=lambda r: (repr(r[1]), r[0]))
    want = sorted(expected, key=lambda e: (repr(e.fields), e.seconds))
    for (millis, fields), row in zip(got, want):
        assert fields == row.fields
        # Nearest millisecond; 1 µs of slack for parsers that keep microseconds first.
        assert abs(Fraction(millis) - row.seconds * 1000) <= Fraction(501, 1000), (millis, float(row.seconds))
