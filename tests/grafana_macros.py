"""What Grafana and the ClickHouse datasource plugin do to a panel's SQL before ClickHouse sees it.

Three steps, in the order the plugin runs them, each ported from its source so that a test can
run a dashboard's exact query text against real ClickHouse:

1. ``$__conditionalAll(condition, $var)``: the plugin's frontend, ``CHDatasource.applyConditionalAll``
   and ``getMacroArgs`` in ``src/data/CHDatasource.ts`` of grafana/clickhouse-datasource **v4.20.0**
   (commit 973c4a508220c378ef8a477f3133bba935ca2345).
2. Template variables: Grafana's ``templateSrv.replace`` (``sceneInterpolator`` and ``formatRegistry``
   in grafana/scenes ``packages/scenes/src/variables/interpolation``), called by the plugin with its
   own ``format`` function (``CHDatasource.format``: an array becomes ``'a','b'``, a single value is
   inserted as is) unless the reference names a format (``${var:sqlstring}``).
3. Backend macros: ``pkg/macros/macros.go`` of the same plugin version (``$__toTime`` is
   ``toDateTime(<unix seconds of the range end>)``, ``$__fromTime`` likewise, ``_ms`` variants use
   ``fromUnixTimestamp64Milli``). The plugin expands them with grafana/macropro, which leaves
   unknown macros untouched and never expands inside string literals or comments.

Only the parts the dashboards use are ported; anything else raises, so a dashboard that starts
using a feature this module does not model fails its tests instead of being checked wrongly.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

PLUGIN_VERSION = "4.20.0"
PLUGIN_COMMIT = "973c4a508220c378ef8a477f3133bba935ca2345"

ALL_VALUE = "$__all"

Value = Union[str, list[str]]


@dataclass
class Variable:
    """A dashboard variable as Grafana holds it at query time."""

    name: str
    value: Value  # "$__all" when All is selected
    options: list[str] = field(default_factory=list)  # option values, for All without a custom allValue
    include_all: bool = False
    all_value: str | None = None
    text: str | None = None

    def resolved(self) -> Value | "CustomAll":
        """scenes ``MultiValueVariable.getValue``: All becomes every option, or the custom all value."""
        if self.value == ALL_VALUE or (isinstance(self.value, list) and self.value[:1] == [ALL_VALUE]):
            if self.all_value:
                return CustomAll(self.all_value)
            return list(self.options)
        return self.value


@dataclass(frozen=True)
class CustomAll:
    """scenes ``CustomAllValue``: inserted unformatted (except for text/percentencode/queryparam)."""

    value: str


# --- step 1: $__conditionalAll (CHDatasource.applyConditionalAll) ------------------------------

_COND_ALL = "$__conditionalAll("
_VAR_IN_PARAM = re.compile(r"(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+")


def _macro_args(query: str, args_index: int) -> list[str]:
    """``getMacroArgs``: split at top-level commas until the bracket that opened the call closes."""
    args: list[str] = []
    bracket_count = 0
    last_arg_end = 1
    sub = query[args_index:]
    for match in re.finditer(r"\(|\)|,", sub):
        node = match.group(0)
        if node == "(":
            bracket_count += 1
        elif node == ")":
            bracket_count -= 1
        if node == "," and bracket_count == 1:
            args.append(sub[last_arg_end:match.end() - 1])
            last_arg_end = match.end()
        if bracket_count == 0:
            args.append(sub[last_arg_end:match.end() - 1])
            return args
    return []


def _js_replace_first(text: str, pattern: str, replacement: str) -> str:
    """JavaScript ``String.prototype.replace(string, string)``: first occurrence, ``$`` patterns honoured."""
    index = text.find(pattern)
    if index < 0:
        return text
    out = []
    i = 0
    while i < len(replacement):
        ch = replacement[i]
        nxt = replacement[i + 1] if i + 1 < len(replacement) else ""
        if ch == "$" and nxt == "$":
            out.append("$")
            i += 2
        elif ch == "$" and nxt == "&":
            out.append(pattern)
            i += 2
        elif ch == "$" and nxt == "`":
            out.append(text[:index])
            i += 2
        elif ch == "$" and nxt == "'":
            out.append(text[index + len(pattern):])
            i += 2
        else:
            out.append(ch)
            i += 1
    return text[:index] + "".join(out) + text[index + len(pattern):]


def apply_conditional_all(raw: str, variables: Mapping[str, Variable]) -> str:
    macro_index = raw.rfind(_COND_ALL)
    while macro_index != -1:
        params = _macro_args(raw, macro_index + len(_COND_ALL) - 1)
        if len(params) != 2:
            return raw
        found = _VAR_IN_PARAM.search(params[1].strip())
        phrase = params[0]
        if found:
            variable = variables.get(found.group(0))
            if variable is not None:
                value = variable.value
                text = ",".join(value) if isinstance(value, list) else str(value)  # Array.toString
                if text in ("", ALL_VALUE):
                    phrase = "1=1"
        raw = _js_replace_first(raw, f"{_COND_ALL}{params[0]},{params[1]})", phrase)
        macro_index = raw.rfind(_COND_ALL)
    return raw


# --- step 2: template variables (sceneInterpolator + formatRegistry) ---------------------------

VARIABLE_REGEX = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")


def clickhouse_format(value: Value) -> str:
    """``CHDatasource.format``: the plugin's default formatting (no escaping at all)."""
    if isinstance(value, list):
        return "'" + "','".join(value) + "'"
    return value


def _sqlstring(value: Value) -> str:
    def one(v: str) -> str:
        return "'" + re.sub(r"'|\"", lambda m: {"'": "''", '"': '\\"'}[m.group(0)], v) + "'"

    return ",".join(one(v) for v in value) if isinstance(value, list) else one(str(value))


def _encode_uri_component_strict(value: str) -> str:
    # encodeURIComponent keeps A-Z a-z 0-9 - _ . ! ~ * ' ( ); the strict variant also encodes !'()*.
    return urllib.parse.quote(value, safe="-_.~")


def _format(name: str, value: Value, variable_name: str) -> str:
    if name == "sqlstring":
        return _sqlstring(value)
    if name == "raw":
        return ",".join(value) if isinstance(value, list) else str(value)
    if name == "doublequote":
        quote = lambda v: '"' + v.replace('"', '\\"') + '"'  # noqa: E731
        return ",".join(quote(v) for v in value) if isinstance(value, list) else quote(str(value))
    if name == "percentencode":
        text = "{" + ",".join(value) + "}" if isinstance(value, list) else str(value)
        return _encode_uri_component_strict(text)
    if name == "queryparam":
        values = value if isinstance(value, list) else [value]
        return "&".join(f"var-{variable_name}={_encode_uri_component_strict(v)}" for v in values)
    raise NotImplementedError(f"variable format {name!r} is not modelled by tests/grafana_macros.py")


def interpolate(
    text: str,
    variables: Mapping[str, Variable],
    default_format: Callable[[Value], str] | None = clickhouse_format,
    scoped: Mapping[str, Callable[[str | None], str]] | None = None,
) -> str:
    """Replace ``$var``, ``${var}``, ``${var:fmt}`` like Grafana; unknown names stay as written.

    ``scoped`` resolves data-link names such as ``__data`` from their field path.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        field_path = match.group(5)
        if scoped and name in scoped:
            value: Value = scoped[name](field_path)
            return _format(fmt, value, name) if fmt else value
        variable = variables.get(name)
        if variable is None:
            return match.group(0)
        resolved = variable.resolved()
        if isinstance(resolved, CustomAll):
            if fmt == "percentencode":
                return _encode_uri_component_strict(resolved.value)
            if fmt in ("text", "queryparam"):
                raise NotImplementedError("text/queryparam of a custom all value")
            return interpolate(resolved.value, variables, default_format)
        if fmt:
            return _format(fmt, resolved, name)
        if default_format is not None:
            return default_format(resolved)
        # Grafana's fallback format is glob.
        if isinstance(resolved, list) and len(resolved) > 1:
            return "{" + ",".join(resolved) + "}"
        return ",".join(resolved) if isinstance(resolved, list) else resolved

    return VARIABLE_REGEX.sub(replace, text)


# --- step 3: backend macros (pkg/macros/macros.go through macropro) ---------------------------

_MACRO = re.compile(r"\$__(\w+)")


@dataclass(frozen=True)
class TimeRange:
    """A panel's time range in epoch milliseconds, as the plugin backend receives it."""

    from_ms: int
    to_ms: int


def _unix(ms: int) -> int:
    # Go's time.Unix() truncates toward the earlier second.
    return ms // 1000


_NO_ARG_MACROS: dict[str, Callable[[TimeRange], str]] = {
    "fromTime": lambda r: f"toDateTime({_unix(r.from_ms)})",
    "toTime": lambda r: f"toDateTime({_unix(r.to_ms)})",
    "fromTime_ms": lambda r: f"fromUnixTimestamp64Milli({r.from_ms})",
    "toTime_ms": lambda r: f"fromUnixTimestamp64Milli({r.to_ms})",
}


def _check_no_hidden_regions(sql: str) -> None:
    """macropro skips string literals and comments; the dashboards keep macros out of both."""
    without_strings = re.sub(r"'(?:\\.|[^'\\])*'", "''", sql)
    if "--" in without_strings or "/*" in without_strings:
        raise NotImplementedError("SQL comments are not modelled; explain queries in the panel description")
    for literal in re.findall(r"'(?:\\.|[^'\\])*'", sql):
        if "$__" in literal and literal != "'$__all'":
            raise NotImplementedError(f"a macro inside a string literal is not modelled: {literal}")


def expand_macros(sql: str, time_range: TimeRange) -> str:
    _check_no_hidden_regions(sql)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        # A string literal holding '$__all' is never a macro call.
        if name == "all":
            return match.group(0)
        if name not in _NO_ARG_MACROS:
            raise NotImplementedError(f"macro $__{name} is not modelled by tests/grafana_macros.py")
        return _NO_ARG_MACROS[name](time_range)

    return _MACRO.sub(replace, sql)


def render_query(raw_sql: str, variables: Mapping[str, Variable], time_range: TimeRange) -> str:
    """The SQL ClickHouse receives for one panel target."""
    sql = apply_conditional_all(raw_sql, variables)
    sql = interpolate(sql, variables)
    return expand_macros(sql, time_range)


def variable_refs(text: str) -> set[str]:
    """Every variable name a text refers to (``$var``, ``${var}``, ``${var:fmt}``, ``[[var]]``)."""
    names = set()
    for match in VARIABLE_REGEX.finditer(text):
        names.add(match.group(1) or match.group(2) or match.group(4))
    return names


def option_values(rows: Sequence[tuple]) -> list[str]:
    """``CHDatasource.metricFindQuery``: one column gives values; with two, the first is the value."""
    return [str(row[0]) for row in rows]
