"""Headless Chromium for the page's tests: Debian's ``chromium`` driven by Playwright.

Nothing is downloaded: Playwright starts the system browser through ``executable_path`` with a new,
empty profile directory. Each page records every request it makes and every console error, so a
test can prove the page stayed on 127.0.0.1 and ran cleanly.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Request, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1600, "height": 1000}


def chromium_path() -> str:
    """Debian's browser; the set-up script installs it, so its absence is a broken set-up, not a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("Chromium is not installed: run scripts/setup --test (it installs Debian's chromium).")
    return found


@contextmanager
def chromium(profile_dir: Path) -> Iterator[BrowserContext]:
    """One headless Chromium on an empty profile; pages share its cookie jar (tests clear it)."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
            locale="en-US",
            timezone_id="UTC",
        )
        try:
            yield context
        finally:
            context.close()


@dataclass
class Watch:
    """What one page did on the network and in its console."""

    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._on_request)
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"uncaught: {error}"))

    def _on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.console_errors.append(message.text)

    def allow(self, pattern: str) -> None:
        """A console error the test provokes on purpose (a refused request logs its status)."""
        self.allowed.append(pattern)

    def unexpected_console_errors(self) -> list[str]:
        return [text for text in self.console_errors if not any(re.search(p, text) for p in self.allowed)]

    def foreign_requests(self, origin: str) -> list[str]:
        """Requests that went anywhere but ``origin`` (``data:`` URLs never leave the page)."""
        host = urlsplit(origin).netloc
        return [url for url in self.requests if not url.startswith("data:") and urlsplit(url).netloc != host]


def new_page(context: BrowserContext, color_scheme: str = "light") -> tuple[Page, Watch]:
    page = context.new_page()
    page.emulate_media(color_scheme=color_scheme)
    watch = Watch()
    watch.attach(page)
    return page, watch


# Text contrast as WCAG 2 defines it, measured on the rendered page: every visible text node's
# colour (SVG text: its fill) against the first opaque background behind it.
CONTRAST_SCRIPT = """
() => {
  const parse = (c) => {
    const m = c.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const lum = ({ r, g, b }) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (node) => {
    for (let n = node; n; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c && c.a >= 0.99) return c;
    }
    return parse(getComputedStyle(document.documentElement).backgroundColor) || { r: 255, g: 255, b: 255, a: 1 };
  };
  const failures = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let t = walker.nextNode(); t; t = walker.nextNode()) {
    const el = t.parentElement;
    if (!t.textContent.trim() || !el || el.closest("[hidden], .skip-link, title")) continue;
    const rect = el.getBoundingClientRect();
    if (rect.width === 0 || rect.height === 0) continue;
    const style = getComputedStyle(el);
    if (style.visibility === "hidden" || style.opacity === "0") continue;
    const fg = parse(el instanceof SVGElement ? style.fill : style.color);
    if (!fg) continue;
    const bg = background(el);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5)) failures.push(`${t.textContent.trim().slice(0, 40)}: ${ratio.toFixed(2)}`);
  }
  return failures;
}
"""


def contrast_failures(page: Page) -> list[str]:
    return page.evaluate(CONTRAST_SCRIPT)
