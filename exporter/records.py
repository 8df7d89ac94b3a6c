"""The gateway record: wire formats, validation, and the row it becomes.

A body is one JSON object, a JSON array of objects, or NDJSON. Each record is validated on its own
so one bad record rejects only itself. Accepted records become :class:`Row` values whose JSON
encoding is exactly one ``JSONEachRow`` line for ``requests``; the spool stores those lines and the
writer hands them to ClickHouse untouched.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

# Generous for any real name, small enough that a hostile record cannot bloat the store.
MAX_STRING_CHARS = 1024
MAX_REQUEST_ID_CHARS = 128
MAX_TOKENS = 2**32 - 1
# A response time over a day is a unit mix-up, not a slow model.
MAX_RESPONSE_TIME_MS = 86_400_000.0
# DateTime64(3) comfortably covers this range; outside it a timestamp is a bug in the sender.
MIN_EPOCH_S = 946_684_800  # 2000-01-01
MAX_EPOCH_S = 4_102_444_800  # 2100-01-01

Endpoint = Literal["completion", "embedding", "other"]
ShortStr = Annotated[str, msgspec.Meta(max_length=MAX_STRING_CHARS)]
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
EpochSeconds = Annotated[float, msgspec.Meta(ge=MIN_EPOCH_S, lt=MAX_EPOCH_S)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class Row(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One row of ``requests``, in column order.

    ``timestamp`` is ClickHouse's own text form in UTC (``2026-11-24 20:13:05.123``): the one
    encoding every ClickHouse parses the same way for DateTime64 (a JSON number is read as seconds
    or as ticks depending on the value). :func:`format_timestamp` makes it from epoch milliseconds.
    """

    timestamp: str
    org: str
    model: str
    endpoint: Endpoint
    status_code: int
    path: str = ""
    method: str = ""
    response_time_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    token_name: str = ""
    token_owner: str = ""
    service_account: str = ""
    team: str = ""
    user_id: str = ""
    request_id: str = ""


class Record(msgspec.Struct, kw_only=True):
    """A record as a gateway sends it; unknown fields are ignored."""

    timestamp: AwareDatetime | EpochSeconds
    org: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STRING_CHARS)]
    model: ShortStr
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)]
    path: ShortStr = ""
    endpoint: Endpoint | None = None
    method: ShortStr = ""
    response_time_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_RESPONSE_TIME_MS)] | None = None
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    token_name: ShortStr = ""
    token_owner: ShortStr = ""
    service_account: ShortStr = ""
    team: ShortStr = ""
    user_id: ShortStr = ""
    request_id: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID_CHARS)] = ""

    def __post_init__(self) -> None:
        # Validated, the record becomes its own row: the timestamp turns into ClickHouse's text
        # form and the endpoint is filled in, so it encodes straight to a JSONEachRow line without
        # building a second object per record on the hot path.
        if isinstance(self.timestamp, datetime):
            if not MIN_EPOCH_S <= self.timestamp.timestamp() < MAX_EPOCH_S:
                raise ValueError("timestamp must be between 2000-01-01 and 2100-01-01")
        self.timestamp = format_timestamp(epoch_millis(self.timestamp))  # type: ignore[assignment]
        if self.endpoint is None:
            self.endpoint = derive_endpoint(self.path)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def epoch_millis(value: datetime | float) -> int:
    """Milliseconds since the epoch, rounded to the nearest millisecond."""
    if isinstance(value, datetime):
        delta = value - _EPOCH
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        return (micros + 500) // 1000
    return round(value * 1000)


def format_timestamp(millis: int) -> str:
    seconds, remainder = divmod(millis, 1000)
    return f"{_second_text(seconds)}.{remainder:03d}"


@lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    # Live traffic arrives in time order, so consecutive records mostly share their second.
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def derive_endpoint(path: str) -> Endpoint:
    lowered = path.lower()
    if "completion" in lowered:
        return "completion"
    if "embedding" in lowered:
        return "embedding"
    return "other"


class BodyError(ValueError):
    """The body as a whole is unreadable (not JSON/NDJSON, or not records at all)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    error: str


# What the spool and the metrics take: a validated Record, or a Row built by an importer.
RowLike = Record | Row


@dataclass(frozen=True, slots=True)
class ParsedBody:
    rows: list[RowLike]
    rejected: list[Rejection]


_record_decoder = msgspec.json.Decoder(Record)
_array_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_row_encoder = msgspec.json.Encoder()
_WHERE = re.compile(r" - at `\$\.?(.*)`$")


def describe_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """msgspec's message, with the JSON path turned into the field name a gateway author knows."""
    text = str(exc)
    match = _WHERE.search(text)
    field = match.group(1) if match else ""
    message = text[: match.start()] if match else text
    if message.startswith("Object missing required field"):
        return f"missing required field {message.split('`')[1]}."
    if message.startswith("Expected `object`"):
        return "a record must be a JSON object."
    message = message.replace("`str`", "a string").replace("`int`", "an integer").replace("`float`", "a number")
    return f"{field or 'record'}: {message[0].lower()}{message[1:].rstrip('.')}."


def _decode_record(raw: bytes | msgspec.Raw, index: int) -> Record | Rejection:
    try:
        return _record_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return Rejection(index, describe_error(exc))
    except msgspec.DecodeError as exc:
        return Rejection(index, f"record is not valid JSON: {exc}.")
    except UnicodeDecodeError:
        # msgspec checks UTF-8 only in the strings it keeps, and raises this instead of DecodeError.
        return Rejection(index, "record is not valid JSON: a string is not valid UTF-8.")
    except RecursionError:
        # msgspec's own depth guard; a few kilobytes of brackets reach it.
        return Rejection(index, "record is not valid JSON: it is nested too deeply.")


def parse_body(body: bytes, ndjson: bool, max_records: int) -> ParsedBody:
    """Validate every record of a body; raise :class:`BodyError` only when no record can be read."""
    stripped = body.lstrip()
    if not stripped:
        raise BodyError("the body is empty; send a JSON object, a JSON array of objects, or NDJSON.")
    if ndjson:
        items: list[bytes | msgspec.Raw] = [line for line in body.splitlines() if line.strip()]
    elif stripped[:1] == b"[":
        try:
            items = list(_array_decoder.decode(body))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BodyError(f"the body is not a valid JSON array: {exc}.") from None
        except RecursionError:
            raise BodyError("the body is not a valid JSON array: it is nested too deeply.") from None
    elif stripped[:1] == b"{":
        items = [body]
    else:
        raise BodyError("the body is not JSON: send a JSON object, a JSON array of objects, or NDJSON.")
    if len(items) > max_records:
        raise BodyError(f"the body holds {len(items)} records, more than the limit of {max_records} per request.")
    if not items:
        raise BodyError("the body holds no records.")
    rows: list[RowLike] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(items):
        outcome = _decode_record(item, index)
        if isinstance(outcome, Record):
            rows.append(outcome)
        else:
            rejected.append(outcome)
    if ndjson and not rows and all(r.error.startswith("record is not valid JSON") for r in rejected):
        raise BodyError("the body is not JSON or NDJSON.")
    return ParsedBody(rows, rejected)


def encode_rows(rows: Sequence[RowLike]) -> bytes:
    """The rows as ``JSONEachRow`` lines, the form the spool keeps and ClickHouse reads."""
    return b"".join(_row_encoder.encode(row) + b"\n" for row in rows)
