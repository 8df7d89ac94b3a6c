"""The Usage page in a real headless Chromium against a real exporter on 127.0.0.1.

The exporter is seeded over HTTP with a known dataset whose records sit well inside the 1h / 1d /
1w windows (never near an edge), so the numbers stay put while the tests run and can be computed
independently here. Every test's page must stay on 127.0.0.1 and log no console error.
"""

from __future__ import annotations

import random
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
import yaml
from playwright.sync_api import BrowserContext, Page, expect

from .browser_support import Watch, chromium, contrast_failures, new_page
from .conftest import REPO, ExporterProcess

ADMIN_KEY = "admin-key-for-page-tests"
ORG_KEY = "globex-org-key"
USER_KEY = "jane-user-key"
JANE = {"org": "acme", "email": "jane@acme.org", "teams": ["ml-team"]}
ARTIFACTS = REPO / "test-artifacts" / "usage-page"

MODELS = {"gpt-4o": "completion", "gpt-4o-mini": "completion", "text-embedding-3-small": "embedding", "o3-pro": "completion"}
USED_MODELS = [("gpt-4o", 5), ("gpt-4o-mini", 8), ("text-embedding-3-small", 4)]  # o3-pro: configured, never used


@dataclass(frozen=True)
class Token:
    name: str
    owner: str = ""
    service_account: str = ""
    team: str = ""


TOKENS = {
    "acme": [Token("jane-laptop", owner="jane@acme.org"), Token("bob-notebook", owner="bob@acme.org"),
             Token("ci-bot-1", service_account="ci-bot", team="ml-team"),
             Token("rag-indexer-2", service_account="rag-indexer", team="platform")],
    "globex": [Token("hank-desktop", owner="hank@globex.com"),
               Token("support-assistant-1", service_account="support-assistant", team="support")],
    "initech": [Token("peter-laptop", owner="peter@initech.io")],
}
USER_IDS = ["jane@acme.org", "u-17", "u-42", "7f9c2a1e-5b1d-4c2e-9a55-0d6f1f0e2b11", ""]
# Seconds before "now" per band: inside 1h; inside 1d only; inside 1w only; outside every window.
BANDS = {"hour": (300, 2_700), "day": (7_200, 72_000), "week": (2 * 86_400, 6 * 86_400), "old": (9 * 86_400, 12 * 86_400)}
COUNTS = {"acme": {"hour": 60, "day": 150, "week": 200, "old": 5},
          "globex": {"hour": 25, "day": 60, "week": 90, "old": 0},
          "initech": {"hour": 0, "day": 0, "week": 40, "old": 0}}
SPANS = {"1h": 3_600, "1d": 86_400, "1w": 7 * 86_400}


def dataset(now: float) -> list[dict[str, Any]]:
    rng = random.Random(20261124)
    records = []
    for org, bands in COUNTS.items():
        for band, count in bands.items():
            low, high = BANDS[band]
            for _ in range(count):
                token = rng.choices(TOKENS[org], weights=range(len(TOKENS[org]) + 1, 1, -1))[0]
                model = rng.choices([m for m, _ in USED_MODELS], weights=[w for _, w in USED_MODELS])[0]
                embedding = MODELS[model] == "embedding"
                record = {
                    "timestamp": round(now - rng.uniform(low, high), 3),
                    "org": org, "model": model,
                    "status_code": rng.choices([200, 429, 500, 400], weights=[92, 4, 2, 2])[0],
                    "path": "/v1/embeddings" if embedding else "/v1/chat/completions",
                    "input_tokens": rng.randint(50, 800) if embedding else rng.randint(200, 9_000),
                    "output_tokens": 0 if embedding else rng.randint(10, 2_500),
                    "token_name": token.name, "token_owner": token.owner,
                    "service_account": token.service_account, "team": token.team,
                    "user_id": rng.choice(USER_IDS),
                    "request_id": f"page-{len(records)}",
                }
                if rng.random() < 0.9:
                    record["response_time_ms"] = round(rng.uniform(40, 300) if embedding else rng.uniform(300, 9_000), 3)
                records.append(record)
    return records


def expected(records: list[dict[str, Any]], now: float, timeframe: str, org: str, token: str | None,
             viewer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The usage answer computed in Python from the records, to hold the page and the API to."""
    start = now - SPANS[timeframe]
    chosen = [r for r in records if start <= r["timestamp"] <= now
              and (org == "all" or r["org"] == org) and (token is None or r["token_name"] == token)]
    if viewer is not None:
        chosen = [r for r in chosen if viewer["email"] in (r["token_owner"], r["user_id"]) or r["team"] in viewer["teams"]]

    def average(kind: str) -> float | None:
        times = [r["response_time_ms"] for r in chosen if MODELS[r["model"]] == kind and "response_time_ms" in r]
        return sum(times) / len(times) if times else None

    key = "org" if org == "all" else "token_name" if token is None else "user_id"
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    models = {name: 0 for name in MODELS}
    for r in chosen:
        group = groups[r[key]]
        group[0] += 1
        group[1] += r["input_tokens"]
        group[2] += r["output_tokens"]
        models[r["model"]] += 1
    inputs = sum(r["input_tokens"] for r in chosen)
    outputs = sum(r["output_tokens"] for r in chosen)
    return {
        "metrics": {
            "total_requests": len(chosen), "failed_requests": sum(r["status_code"] >= 400 for r in chosen),
            "avg_response_time_ms_completion": average("completion"), "avg_response_time_ms_embedding": average("embedding"),
            "input_tokens": inputs, "output_tokens": outputs, "total_tokens": inputs + outputs,
        },
        "top": sorted(((name, g[0], g[1], g[2]) for name, g in groups.items()), key=lambda row: (-row[1], row[0])),
        "models": sorted(models.items(), key=lambda item: (-item[1], item[0])),
    }


@dataclass
class Site:
    url: str
    records: list[dict[str, Any]]
    now: float

    def api(self, key: str, **params: str) -> dict[str, Any]:
        answer = requests.get(self.url + "/api/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("page")
    config = {
        "timezone": "UTC",
        "models": [{"name": name, "endpoint": endpoint} for name, endpoint in MODELS.items()],
        "viewers": [{"key": ADMIN_KEY, "role": "admin"}, {"key": ORG_KEY, "role": "org", "org": "globex"},
                    {"key": USER_KEY, "role": "user", **JANE}],
        "writer": {"max_age_s": 0.1},
    }
    config_file = root / "exporter.yaml"
    config_file.write_text(yaml.safe_dump(config))
    proc = ExporterProcess(root / "data", config_file=config_file).start()
    try:
        now = time.time()
        records = dataset(now)
        answer = requests.post(proc.url + "/v1/requests", json=records, timeout=60)
        assert answer.status_code == 202 and answer.json()["accepted"] == len(records), answer.text
        _wait_stored(proc.url, len(records))
        yield Site(proc.url, records, now)
    finally:
        proc.kill()


def _wait_stored(url: str, count: int) -> None:
    deadline = time.monotonic() + 60
    stored = None
    while time.monotonic() < deadline:
        answer = requests.post(url + "/api/v1/sql", data="SELECT count() AS n FROM requests",
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        stored = int(answer.json()["data"][0]["n"])
        if stored == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{stored} of {count} seeded records reached ClickHouse")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def tab(browser: BrowserContext, site: Site) -> Iterator[tuple[Page, Watch]]:
    """A fresh page with no login; afterwards: nothing left 127.0.0.1 and nothing hit the console."""
    browser.clear_cookies()
    page, watch = new_page(browser)
    page.set_default_timeout(15_000)
    yield page, watch
    page.close()
    assert watch.requests, "the page made no requests at all"
    assert watch.foreign_requests(site.url) == []
    assert all(url.startswith("http://127.0.0.1:") for url in watch.requests)
    assert watch.unexpected_console_errors() == []


# ---- helpers -------------------------------------------------------------------------------------


def view_query(org: str, timeframe: str = "1d", token: str | None = None, top: str = "10") -> str:
    params = {"org": org} | ({"token": token} if token else {}) | {"timeframe": timeframe, "top": top}
    return urlencode(params)


def wait_for_view(page: Page, query: str) -> None:
    page.locator(f'#dashboard[data-state="ready"][data-query="{query}"]').wait_for()


def log_in(page: Page, site: Site, key: str, path: str = "/") -> None:
    page.goto(site.url + path)
    page.get_by_label("Viewer key").fill(key)
    page.get_by_role("button", name="Log in").click()
    page.locator('#dashboard[data-state="ready"]').wait_for()


def url_state(page: Page) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(page.url).query).items()}


def read_view(page: Page) -> dict[str, Any]:
    return page.evaluate("""() => ({
      metrics: Object.fromEntries([...document.querySelectorAll('[data-metric]')].map(n => [n.dataset.metric, n.textContent.trim()])),
      headers: [...document.querySelectorAll('#top-table thead th')].map(th => th.textContent.trim()),
      rows: [...document.querySelectorAll('#top-table tbody tr')].map(tr => [...tr.children].map(td => td.textContent.trim())),
      models: [...document.querySelectorAll('#models li')].map(li => ({
        model: li.querySelector('.bar-name').textContent, value: li.querySelector('.bar-value').textContent,
        width: li.querySelector('.bar-fill').getBoundingClientRect().width,
        track: li.querySelector('.bar-track').getBoundingClientRect().width })),
      bars: [...document.querySelectorAll('#timeseries rect.bar')].map(r => [r.dataset.t, Number(r.dataset.requests)]),
      title: document.getElementById('top-title').textContent.trim(),
      empty: [...document.querySelectorAll('.empty')].filter(n => n.offsetParent !== null).map(n => n.textContent.trim()),
    })""")


def shown_number(text: str) -> float:
    assert re.fullmatch(r"\d{1,3}(,\d{3})*(\.\d)?", text), f"{text!r} is not a number with thousands separators"
    return float(text.replace(",", ""))


def assert_view_matches(page: Page, answer: dict[str, Any]) -> None:
    """The seven numbers, the table and the model bars on the page are the API's answer."""
    view = read_view(page)
    for key, value in answer["metrics"].items():
        text = view["metrics"][key]
        if value is None:
            assert text == "–", key
        elif key.startswith("avg_response_time_ms"):
            assert re.fullmatch(r"\d{1,3}(,\d{3})*\.\d", text), f"{key}: {text!r} is not ms with one decimal"
            assert abs(shown_number(text) - value) <= 0.05 + 1e-9, key
        else:
            assert text == f"{value:,}", key

    kind_column = {"org": "Organization", "token": "Token Name", "user_id": "User ID"}[answer["scope"]["top_kind"]]
    extra = ["Token Owner", "Service Account"] if answer["scope"]["top_kind"] == "token" else []
    assert view["headers"] == ["#", kind_column, "Requests", "Input Tokens", "Output Tokens", "Total Tokens", *extra]
    wanted_rows = []
    for row in answer["top"]:
        name = row["name"] or ("(no user id)" if answer["scope"]["top_kind"] == "user_id" else "(none)")
        cells = [str(row["rank"]), name] + [f"{row[k]:,}" for k in ("requests", "input_tokens", "output_tokens", "total_tokens")]
        if extra:
            cells += [row["token_owner"] or "–", row["service_account"] or "–"]
        wanted_rows.append(cells)
    assert view["rows"] == wanted_rows

    assert [(m["model"], m["value"]) for m in view["models"]] == [(m["model"], f"{m['requests']:,}") for m in answer["models"]]
    biggest = max([m["requests"] for m in answer["models"]] + [1])
    for shown, model in zip(view["models"], answer["models"]):
        assert shown["width"] == pytest.approx(shown["track"] * model["requests"] / biggest, abs=1.5), model["model"]

    if answer["metrics"]["total_requests"]:
        # The chart's buckets are the API's; a minute may have ticked between the two answers.
        api_points = {p["t"]: p["requests"] for p in answer["timeseries"]}
        shared = [(t, n) for t, n in view["bars"] if t in api_points]
        assert len(shared) >= len(answer["timeseries"]) - 1
        assert all(api_points[t] == n for t, n in shared)
        assert sum(n for _, n in view["bars"]) == answer["metrics"]["total_requests"]


def assert_api_is_independent_truth(answer: dict[str, Any], truth: dict[str, Any]) -> None:
    for key, value in truth["metrics"].items():
        if isinstance(value, float):
            # Response times are microsecond-exact in ClickHouse; the API rounds averages to 1 us.
            assert answer["metrics"][key] == pytest.approx(value, abs=0.001), key
        else:
            assert answer["metrics"][key] == value, key
    rows = [(r["name"], r["requests"], r["input_tokens"], r["output_tokens"]) for r in answer["top"] if r["name"]]
    assert rows == [row for row in truth["top"] if row[0]][: len(rows)]
    assert [(m["model"], m["requests"]) for m in answer["models"]] == truth["models"]


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert contrast_failures(page) == [], f"low text contrast in the {scheme} scheme"
        page.screenshot(path=str(ARTIFACTS / f"{name}-{scheme}.png"), full_page=True)
    page.emulate_media(color_scheme="light")


# ---- tests ---------------------------------------------------------------------------------------


def test_login_form_keeps_a_session_cookie_not_the_key(tab, browser, site):
    page, watch = tab
    page.goto(site.url + "/?org=acme&timeframe=1w&top=10")
    expect(page.get_by_role("heading", name="Log in to the Usage page")).to_be_visible()
    page.get_by_label("Viewer key").fill("not-a-key")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not a valid viewer key.")
    watch.allow(r"status of 401")  # the refused login answers 401

    page.get_by_label("Viewer key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Log in").click()
    # The login lands on the view the link asked for.
    wait_for_view(page, view_query("acme", "1w"))
    [cookie] = browser.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert ADMIN_KEY not in cookie["value"]
    assert page.evaluate("document.cookie") == ""
    expect(page.locator("#who")).to_have_text("global admin")


def test_admin_sees_the_apis_numbers_in_all_three_scopes(tab, site):
    page, _ = tab
    log_in(page, site, ADMIN_KEY)
    scopes = [("organizations", "all", None), ("tokens", "acme", None), ("user-ids", "acme", "jane-laptop")]
    for name, org, token in scopes:
        page.goto(site.url + "/?" + view_query(org, "1d", token))
        wait_for_view(page, view_query(org, "1d", token))
        answer = site.api(ADMIN_KEY, **dict(parse_qs(view_query(org, "1d", token))))
        assert answer["scope"]["top_kind"] == {"organizations": "org", "tokens": "token", "user-ids": "user_id"}[name]
        assert_api_is_independent_truth(answer, expected(site.records, site.now, "1d", org, token))
        assert_view_matches(page, answer)
        screenshot(page, name)
    # The configured model nobody used is on the chart, with nothing in its bar.
    zero = page.locator('#models li[data-model="o3-pro"]')
    expect(zero.locator(".bar-value")).to_have_text("0")


def test_time_frame_org_and_drill_down_change_the_view_and_the_url(tab, site):
    page, _ = tab
    log_in(page, site, ADMIN_KEY)
    assert url_state(page) == {"org": "all", "timeframe": "1d", "top": "10"}

    # Time frame tabs by keyboard: arrow left from 1d selects 1h.
    page.get_by_role("tab", name="1d").focus()
    page.keyboard.press("ArrowLeft")
    wait_for_view(page, view_query("all", "1h"))
    expect(page.get_by_role("tab", name="1h")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name="1h")).to_be_focused()
    assert url_state(page)["timeframe"] == "1h"
    assert_view_matches(page, site.api(ADMIN_KEY, org="all", timeframe="1h"))
    page.keyboard.press("End")
    wait_for_view(page, view_query("all", "1w"))

    # The organization dropdown.
    page.get_by_label("Organization", exact=True).select_option("globex")
    wait_for_view(page, view_query("globex", "1w"))
    assert url_state(page) == {"org": "globex", "timeframe": "1w", "top": "10"}
    assert_view_matches(page, site.api(ADMIN_KEY, org="globex", timeframe="1w"))
    expect(page.get_by_label("Organization", exact=True)).to_have_value("globex")
    expect(page.locator("#org-select option")).to_have_text(["All", "acme", "globex", "initech"])
    # The dropdown by keyboard: the next organization down.
    page.get_by_label("Organization", exact=True).focus()
    page.keyboard.press("ArrowDown")
    wait_for_view(page, view_query("initech", "1w"))
    assert url_state(page)["org"] == "initech"

    # Drill down: all organizations -> acme's tokens -> ci-bot-1's user ids, by mouse and keyboard.
    page.get_by_role("link", name="All organizations").click()
    wait_for_view(page, view_query("all", "1w"))
    page.locator("#top-table").get_by_role("link", name="acme").click()
    wait_for_view(page, view_query("acme", "1w"))
    expect(page.locator("#top-title")).to_have_text("Request Counts by Token")
    links = page.locator("#top-table tbody a")
    links.first.focus()
    page.keyboard.press("ArrowDown")
    second = links.nth(1).text_content()
    expect(links.nth(1)).to_be_focused()
    page.keyboard.press("Enter")
    wait_for_view(page, view_query("acme", "1w", second))
    assert url_state(page) == {"org": "acme", "token": second, "timeframe": "1w", "top": "10"}
    expect(page.locator("#top-title")).to_have_text("Request Counts by User ID")
    assert_view_matches(page, site.api(ADMIN_KEY, org="acme", token=second, timeframe="1w"))

    # Back up: the breadcrumb, and the browser's back button.
    page.locator("#breadcrumb").get_by_role("link", name="acme").click()
    wait_for_view(page, view_query("acme", "1w"))
    page.go_back()
    wait_for_view(page, view_query("acme", "1w", second))
    page.go_back()
    wait_for_view(page, view_query("acme", "1w"))
    page.go_back()
    wait_for_view(page, view_query("all", "1w"))

    # More rows.
    page.get_by_label("Table rows").select_option("25")
    wait_for_view(page, view_query("all", "1w", top="25"))
    assert url_state(page)["top"] == "25"


def test_a_shared_link_opens_the_same_view(tab, site):
    page, _ = tab
    log_in(page, site, ADMIN_KEY, "/?org=acme&token=ci-bot-1&timeframe=1w&top=25")
    wait_for_view(page, view_query("acme", "1w", "ci-bot-1", "25"))
    expect(page.get_by_label("Organization", exact=True)).to_have_value("acme")
    expect(page.get_by_role("tab", name="1w")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_label("Table rows")).to_have_value("25")
    expect(page.locator("#breadcrumb [aria-current=page]")).to_have_text("ci-bot-1")
    answer = site.api(ADMIN_KEY, org="acme", token="ci-bot-1", timeframe="1w", top="25")
    assert_api_is_independent_truth(answer, expected(site.records, site.now, "1w", "acme", "ci-bot-1"))
    assert_view_matches(page, answer)


def test_a_user_key_sees_only_its_org_and_no_dropdown(tab, site):
    page, watch = tab
    log_in(page, site, USER_KEY)
    wait_for_view(page, view_query("acme", "1d"))
    expect(page.locator("#org-select")).to_have_count(0)
    expect(page.locator("#org-fixed")).to_have_text("acme")
    expect(page.locator("#who")).to_have_text("jane@acme.org (acme)")
    answer = site.api(USER_KEY, timeframe="1d")
    truth = expected(site.records, site.now, "1d", "acme", None, viewer=JANE)
    assert_api_is_independent_truth(answer, truth)
    assert_view_matches(page, answer)
    # Only jane's records: her token, her team's service account, and others' tokens where she is the user id.
    assert [row[1:3] for row in read_view(page)["rows"]] == [[name, f"{n:,}"] for name, n, _, _ in truth["top"]]
    assert answer["metrics"]["total_requests"] < expected(site.records, site.now, "1d", "acme", None)["metrics"]["total_requests"]
    screenshot(page, "user-key")

    # Another org's link is refused by the API, and the page says so instead of showing numbers.
    watch.allow(r"status of 403")
    page.goto(site.url + "/?org=globex&timeframe=1d&top=10")
    page.locator('#dashboard[data-state="error"]').wait_for(state="attached")
    expect(page.locator("#error-text")).to_contain_text("This view could not be loaded:")
    expect(page.locator("#dashboard")).to_be_hidden()


def test_an_empty_window_says_so(tab, site):
    page, _ = tab
    log_in(page, site, ADMIN_KEY, "/?org=initech&timeframe=1h&top=10")
    wait_for_view(page, view_query("initech", "1h"))
    view = read_view(page)
    assert view["empty"] == ["no requests in this window"] * 3
    assert view["metrics"]["total_requests"] == "0"
    assert view["metrics"]["avg_response_time_ms_completion"] == "–"
    assert view["rows"] == [] and view["bars"] == []
    assert [m["value"] for m in view["models"]] == ["0"] * len(MODELS)


def test_logging_out_ends_the_session(tab, site):
    page, watch = tab
    log_in(page, site, ADMIN_KEY)
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("Viewer key")).to_be_visible()
    watch.allow(r"status of 401")
    status = page.evaluate("fetch('/api/v1/usage').then(r => r.status)")
    assert status == 401


def test_an_org_key_is_pinned_to_its_org(tab, site):
    page, _ = tab
    log_in(page, site, ORG_KEY)
    wait_for_view(page, view_query("globex", "1d"))
    expect(page.locator("#org-select")).to_have_count(0)
    expect(page.locator("#breadcrumb")).not_to_contain_text("All organizations")
    answer = site.api(ORG_KEY, timeframe="1d")
    assert_api_is_independent_truth(answer, expected(site.records, site.now, "1d", "globex", None))
    assert_view_matches(page, answer)


def test_loading_and_unreachable_states(tab, site):
    page, watch = tab
    log_in(page, site, ADMIN_KEY)
    held = []
    page.route("**/api/v1/usage?*", lambda route: held.append(route))
    page.get_by_role("tab", name="1w").click()
    # While the answer is on its way the page says so and marks the dashboard busy.
    expect(page.locator("#dashboard")).to_have_attribute("aria-busy", "true")
    expect(page.locator("#status")).to_have_text("Loading all organizations, last week…")
    page.wait_for_timeout(100)
    held.pop().continue_()
    wait_for_view(page, view_query("all", "1w"))

    # The exporter gone: one clear sentence and a way to try again.
    page.unroute("**/api/v1/usage?*")
    page.route("**/api/v1/usage?*", lambda route: route.abort())
    watch.allow(r"net::ERR_FAILED")
    page.get_by_role("button", name="Refresh").click()
    page.locator('#dashboard[data-state="error"]').wait_for(state="attached")
    expect(page.get_by_role("alert")).to_contain_text("The exporter did not answer.")
    page.unroute("**/api/v1/usage?*")
    page.get_by_role("button", name="Try again").click()
    wait_for_view(page, view_query("all", "1w"))
    expect(page.get_by_role("alert")).to_be_hidden()
