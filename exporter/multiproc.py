"""The exposition of prometheus-client's multiprocess files, fast enough for large scrapes.

Under a multi-worker server every worker writes its values to memory-mapped files
(``counter_<pid>.db``, ``gauge_<mode>_<pid>.db``, ``histogram_<pid>.db``) and a scrape must sum
them. prometheus-client's ``MultiProcessCollector`` plus its encoder takes about a second for 10k
series on the reference machine: it parses every key's JSON on every scrape and builds an object
per sample. This module merges the same files by the same rules (counters and histograms summed
over all workers, gauges by their multiprocess mode) but parses each key once per process and
writes the exposition text directly. ``tests/test_metrics_multiprocess.py`` pins its output to
prometheus-client's own, sample for sample.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.utils import floatToGoString

from .llm_metrics import escape_label_value


def _number(value: float) -> str:
    return repr(value) if math.isfinite(value) else floatToGoString(value)


class _Key:
    """One parsed file key: family, sample name, label text (without ``le``), the ``le`` bound."""

    __slots__ = ("family", "sample", "labels", "le", "le_text", "help")

    def __init__(self, raw: str) -> None:
        self.family, self.sample, labels, self.help = json.loads(raw)
        le = labels.pop("le", None)
        self.le = float(le) if le is not None else None
        self.le_text = floatToGoString(self.le) if le is not None else None
        # The key's labels are sorted by name (prometheus-client writes them with sort_keys).
        self.labels = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels.items())


class _Family:
    __slots__ = ("name", "typ", "help", "mode", "samples", "stamps", "buckets", "le_text")

    def __init__(self, name: str, typ: str, help_text: str, mode: str) -> None:
        self.name = name
        self.typ = typ
        self.help = help_text
        self.mode = mode
        self.samples: dict[tuple[str, str], float] = {}
        self.stamps: dict[tuple[str, str], float] = {}
        self.buckets: dict[str, dict[float, float]] = {}
        self.le_text: dict[float, str] = {}


class MultiProcessRenderer:
    """Renders one server's multiprocess directory; keeps parsed keys between scrapes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[str, _Key] = {}

    def _key(self, raw: str) -> _Key:
        key = self._keys.get(raw)
        if key is None:
            key = self._keys[raw] = _Key(raw)
        return key

    def merge(self) -> dict[str, _Family]:
        families: dict[str, _Family] = {}
        for path in sorted(glob.glob(os.path.join(self.directory, "*.db"))):
            parts = os.path.basename(path)[:-3].split("_")
            typ, pid = parts[0], parts[-1]
            mode = parts[1] if typ == "gauge" else ""
            try:
                entries = list(MmapedDict.read_all_values_from_file(path))
            except FileNotFoundError:
                continue  # a dead worker's live gauges, removed since the glob
            for raw, value, stamp, _ in entries:
                key = self._key(raw)
                family = families.get(key.family)
                if family is None:
                    family = families[key.family] = _Family(key.family, typ, key.help, mode)
                if key.le is not None:
                    bounds = family.buckets.setdefault(key.labels, {})
                    bounds[key.le] = bounds.get(key.le, 0.0) + value
                    family.le_text[key.le] = key.le_text
                    continue
                labels = key.labels
                if mode in ("all", "liveall"):
                    labels = f'{labels},pid="{pid}"' if labels else f'pid="{pid}"'
                _combine(family, (key.sample, labels), value, stamp)
        return families

    def render(self, openmetrics: bool) -> str:
        out: list[str] = []
        add = out.append
        for family in self.merge().values():
            name = family.name + "_total" if family.typ == "counter" and not openmetrics else family.name
            help_text = escape_label_value(family.help) if openmetrics else family.help.replace("\\", r"\\").replace("\n", r"\n")
            add(f"# HELP {name} {help_text}\n# TYPE {name} {family.typ}\n")
            if family.typ == "histogram":
                _render_histogram(family, add)
                continue
            for (sample, labels), value in family.samples.items():
                add(f"{sample}{{{labels}}} {_number(value)}\n" if labels else f"{sample} {_number(value)}\n")
        if openmetrics:
            add("# EOF\n")
        return "".join(out)


def _combine(family: _Family, slot: tuple[str, str], value: float, stamp: float) -> None:
    """Fold one worker's value into the family, by prometheus-client's multiprocess rules."""
    samples = family.samples
    current = samples.get(slot)
    if current is None:
        samples[slot] = value
        family.stamps[slot] = stamp
        return
    mode = family.mode
    if family.typ != "gauge" or mode in ("sum", "livesum"):
        samples[slot] = current + value
    elif mode in ("max", "livemax"):
        samples[slot] = max(current, value)
    elif mode in ("min", "livemin"):
        samples[slot] = min(current, value)
    elif mode in ("mostrecent", "livemostrecent"):
        if stamp > family.stamps[slot]:
            samples[slot] = value
            family.stamps[slot] = stamp
    else:  # all, liveall: each worker has its own pid label, so slots never collide
        samples[slot] = value


def _render_histogram(family: _Family, add) -> None:
    name = family.name
    for labels, bounds in family.buckets.items():
        prefix = labels + "," if labels else ""
        running = 0.0
        for le in sorted(bounds):
            running += bounds[le]
            add(f'{name}_bucket{{{prefix}le="{family.le_text[le]}"}} {_number(running)}\n')
        braced = f"{{{labels}}}" if labels else ""
        add(f"{name}_count{braced} {_number(running)}\n")
        total = family.samples.get((name + "_sum", labels))
        if total is not None:
            add(f"{name}_sum{braced} {_number(total)}\n")
