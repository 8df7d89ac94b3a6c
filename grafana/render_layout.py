"""Draw a dashboard's panel grid as SVG, for the README where no Grafana screenshot can be taken.

    python grafana/render_layout.py            # rewrites docs/img/<dashboard uid>-layout.svg

Each panel is a box at its gridPos (24 columns wide), labelled with its title and type; variables
are drawn as the dropdown bar above the grid.
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "grafana" / "dashboards"
OUT = REPO / "docs" / "img"

COLUMN_PX = 40
ROW_PX = 30
BAR_PX = 40
FILL = {"stat": "#e8f1fb", "timeseries": "#eaf6ec", "table": "#fdf3e4", "barchart": "#f3ecfa", "row": "#eeeeee"}
SHOWN_TYPE = {"stat": "stat", "timeseries": "time series", "table": "table", "barchart": "bar chart", "row": "row"}


def _text(x: float, y: float, content: str, size: int, weight: str = "normal", anchor: str = "middle") -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="{size}" '
            f'font-weight="{weight}" text-anchor="{anchor}" fill="#1f2328">{escape(content)}</text>')


def _lines(title: str, width_px: int, size: int) -> list[str]:
    """Break a title into at most two lines that fit the box (about 0.6 em per character)."""
    limit = max(4, int(width_px / (size * 0.6)))
    lines, current = [], ""
    for word in title.split():
        candidate = f"{current} {word}".strip()
        if len(candidate) <= limit or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > 2:
        lines = [lines[0], " ".join(lines[1:])]
    return [line if len(line) <= limit else line[: limit - 1] + "…" for line in lines]


def render(dashboard: dict) -> str:
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, height = 24 * COLUMN_PX, BAR_PX + rows * ROW_PX
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    labels = [v.get("label") or v["name"] for v in dashboard["templating"]["list"] if v.get("hide", 0) == 0]
    parts.append(_text(8, BAR_PX / 2 + 5, dashboard["title"], 15, "bold", "start"))
    for index, label in enumerate(labels):
        parts.append(_text(200 + index * 150, BAR_PX / 2 + 5, f"{label} ▾", 13, "normal", "start"))
    for panel in panels:
        grid = panel["gridPos"]
        x, y = grid["x"] * COLUMN_PX, BAR_PX + grid["y"] * ROW_PX
        w, h = grid["w"] * COLUMN_PX, grid["h"] * ROW_PX
        kind = panel["type"]
        parts.append(f'<rect x="{x + 2}" y="{y + 2}" width="{w - 4}" height="{h - 4}" rx="4" '
                     f'fill="{FILL.get(kind, "#f6f8fa")}" stroke="#8c959f"/>')
        title = panel["title"].replace("${top_kind}", "Organization / Token / User ID")
        if kind == "row":
            parts.append(_text(x + 8, y + h / 2 + 5, title, 13, "bold", "start"))
            continue
        size = 12 if w < 6 * COLUMN_PX else 14
        lines = _lines(title, w - 8, size)
        top = y + h / 2 - (len(lines) - 1) * (size + 2) / 2
        for number, line in enumerate(lines):
            parts.append(_text(x + w / 2, top + number * (size + 2), line, size, "bold"))
        parts.append(_text(x + w / 2, top + (len(lines) - 1) * (size + 2) + 18, SHOWN_TYPE.get(kind, kind), 11))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def outputs() -> dict[Path, str]:
    rendered = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        rendered[OUT / f"{dashboard['uid']}-layout.svg"] = render(dashboard)
    return rendered


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for target, svg in outputs().items():
        target.write_text(svg, encoding="utf-8")
        print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
