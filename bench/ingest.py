"""Ingest benchmark: the exporter as a real process on 127.0.0.1, driven by wrk.

Measures in one run:
  (a) records/s for 1,000-record batches over HTTP (acknowledged = durable in the spool), and the
      end-to-end rate until the last record is in ClickHouse;
  (b) requests/s and p50/p99 latency for single-record POSTs;
  (c) the ceiling: the same records inserted directly with clickhouse-connect into the same
      embedded store (client.insert of Python rows, and raw JSONEachRow with the writer's settings and with
      ClickHouse's defaults), and the ratio (a)/(c);
  and peak RSS, sampled over a sustained run (--rss-seconds, default 120).

Usage: .venv/bin/python bench/ingest.py [--seconds 20] [--rss-seconds 120]
Needs wrk (Debian package `wrk`; installed by this script when missing and running as root).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exporter.demo import generate  # noqa: E402
from exporter.records import Row  # noqa: E402

WRK_POST = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %f %f\\n", summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wire_records(count: int, seed: int) -> list[dict]:
    """Demo rows as a gateway would send them (no request_id: the same body is posted many times)."""
    out = []
    for row in generate(count, 7, seed):
        record = {f: getattr(row, f) for f in Row.__struct_fields__ if f not in ("timestamp", "request_id", "endpoint")}
        record["timestamp"] = row.timestamp.replace(" ", "T") + "Z"
        if record["response_time_ms"] is None:
            del record["response_time_ms"]
        out.append(record)
    return out


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk") or "wrk"


def run_wrk(url: str, body: Path, seconds: int, connections: int, workdir: Path) -> dict:
    script = workdir / f"post-{body.stem}.lua"
    script.write_text(WRK_POST.replace("{body}", str(body)))
    out = subprocess.run(
        [ensure_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url + "/v1/requests"],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", out)
    assert match, out
    reqs, duration_us, bad_status, socket_errors, p50, p99 = match.groups()
    return {
        "requests": int(reqs), "seconds": int(duration_us) / 1e6, "bad_status": int(bad_status),
        "socket_errors": int(socket_errors), "p50_ms": float(p50) / 1000, "p99_ms": float(p99) / 1000,
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Exporter:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = data_dir.parent / "bench-config.yaml"
        config.write_text("writer: {batch_rows: 200000, max_age_s: 1.0}\nspool: {max_bytes: 4294967296}\nthreads: 16\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", "serve", "--data-dir", str(data_dir), "--port", str(self.port), "--config", str(config)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(data_dir.parent / "exporter.log", "wb"),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("exporter did not start")

    def count(self) -> int:
        return int(requests.post(self.url + "/api/v1/sql?format=TSV", data="SELECT count() FROM requests", timeout=60).text)

    def wait_drained(self) -> None:
        while requests.get(self.url + "/readyz", timeout=10).json()["spool"]["records"]:
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def ceiling(data_dir: Path, records: list[dict], total: int) -> dict:
    """Insert ``total`` copies of the records straight into ``requests`` of the same embedded store.

    The same table the exporter writes, materialized views (request ids, usage rollups) included,
    with the writer's client and insert settings, so the ratio measures the exporter's own overhead
    and not a cheaper table.
    """
    from datetime import datetime, timezone

    import clickhouse_connect
    import msgspec

    from exporter.records import Record, encode_rows
    from exporter.storage import REQUESTS_INSERT_SETTINGS

    client = clickhouse_connect.get_client(dsn=f"chdb://{data_dir / 'clickhouse'}",
                                           settings={"deduplicate_blocks_in_dependent_materialized_views": 1})
    rows = [msgspec.convert(r, Record) for r in records]
    columns = list(Row.__struct_fields__)
    python_rows = [[getattr(row, c) for c in columns] for row in rows]
    for values in python_rows:  # client.insert wants native values: DateTime64 as datetime
        values[0] = datetime.strptime(values[0], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
    payload = encode_rows(rows)
    # Every block carries its own de-duplication token, as the writer's batches do: the same rows
    # inserted again without one would be dropped as a repeated block by the views' tables (they
    # keep a de-duplication window), and the ceiling would time inserts that feed no rollup.
    blocks = itertools.count()

    def settings(base: Mapping[str, object]) -> dict:
        return dict(base) | {"insert_deduplication_token": f"ceiling-{next(blocks)}"}

    def stored() -> int:
        return client.query("SELECT count() FROM llm_usage.requests").result_rows[0][0]

    before = stored()
    started = time.perf_counter()
    inserted = 0
    while inserted < total:
        client.insert("llm_usage.requests", python_rows, column_names=columns, settings=settings(REQUESTS_INSERT_SETTINGS))
        inserted += len(python_rows)
    native = inserted / (time.perf_counter() - started)
    # The writer's settings against ClickHouse's defaults, alternated in rounds so that both see
    # the same neighbours and the same table size.
    variants = {"writer": REQUESTS_INSERT_SETTINGS, "defaults": {"max_partitions_per_insert_block": 0}}
    raw_elapsed = dict.fromkeys(variants, 0.0)
    raw_rows = dict.fromkeys(variants, 0)
    for round_ in range(1, 5):
        for name, base in variants.items():
            started = time.perf_counter()
            while raw_rows[name] < round_ * total // 4:
                client.raw_insert("llm_usage.requests", None, payload, fmt="JSONEachRow", settings=settings(base))
                raw_rows[name] += len(rows)
            raw_elapsed[name] += time.perf_counter() - started
    written = stored() - before
    expected = inserted + sum(raw_rows.values())
    assert written == expected, f"the ceiling inserted {expected:,} rows but {written:,} were stored"
    # What the materialized views cost: the same inserts into a copy of requests that has none.
    client.command("CREATE TABLE llm_usage.requests_without_views AS llm_usage.requests")
    started = time.perf_counter()
    bare = 0
    while bare < total // 4:
        client.raw_insert("llm_usage.requests_without_views", None, payload, fmt="JSONEachRow",
                          settings=settings(REQUESTS_INSERT_SETTINGS))
        bare += len(rows)
    bare_rate = bare / (time.perf_counter() - started)
    client.command("DROP TABLE llm_usage.requests_without_views")
    client.close()
    return {"insert_rows_per_s": native, "without_views_rows_per_s": bare_rate,
            "raw_jsoneachrow_rows_per_s": raw_rows["writer"] / raw_elapsed["writer"],
            "raw_defaults_rows_per_s": raw_rows["defaults"] / raw_elapsed["defaults"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20, help="duration of each wrk phase")
    parser.add_argument("--rss-seconds", type=int, default=120, help="duration of the sustained run sampling RSS")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    data_dir = workdir / "data"
    records = wire_records(100_000, seed=1)
    batch_body = workdir / "batch.json"
    batch_body.write_text(json.dumps(records[:1000]))
    single_body = workdir / "single.json"
    single_body.write_text(json.dumps(records[0]))

    exporter = Exporter(data_dir)
    results: dict[str, object] = {}
    try:
        run_wrk(exporter.url, batch_body, 3, 4, workdir)  # warm-up
        exporter.wait_drained()
        before = exporter.count()
        started = time.monotonic()
        batch = run_wrk(exporter.url, batch_body, args.seconds, 4, workdir)
        acked_records = (batch["requests"] - batch["bad_status"]) * 1000
        exporter.wait_drained()
        end_to_end_s = time.monotonic() - started
        stored = exporter.count() - before
        results["batch"] = batch | {"records_per_s": acked_records / batch["seconds"], "end_to_end_records_per_s": stored / end_to_end_s,
                                    "stored": stored, "acked": acked_records}

        single = run_wrk(exporter.url, single_body, args.seconds, 16, workdir)
        results["single"] = single | {"requests_per_s": (single["requests"] - single["bad_status"]) / single["seconds"]}
        exporter.wait_drained()

        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            start = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - start, rss_kib(exporter.proc.pid)))
                stop.wait(5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        # Sustained mixed load: batches and singles at once.
        both = [threading.Thread(target=run_wrk, args=(exporter.url, batch_body, args.rss_seconds, 2, workdir)),
                threading.Thread(target=run_wrk, args=(exporter.url, single_body, args.rss_seconds, 4, workdir))]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join()
        stop.set()
        sampler.join()
        results["rss_kib"] = samples
    finally:
        exporter.stop()

    results["ceiling"] = ceiling(data_dir, records, 2_000_000)
    a = results["batch"]["records_per_s"]
    c = results["ceiling"]["insert_rows_per_s"]
    c_raw = results["ceiling"]["raw_jsoneachrow_rows_per_s"]
    rss = [kib for _, kib in results["rss_kib"]]
    print()
    print("| measurement | value |")
    print("| --- | --- |")
    print(f"| (a) 1,000-record batches over HTTP, acknowledged | {a:,.0f} records/s |")
    print(f"| (a') same, end to end until stored in ClickHouse | {results['batch']['end_to_end_records_per_s']:,.0f} records/s |")
    print(f"| (a) batch latency p50 / p99 | {results['batch']['p50_ms']:.1f} / {results['batch']['p99_ms']:.1f} ms |")
    print(f"| (b) single-record POSTs | {results['single']['requests_per_s']:,.0f} requests/s |")
    print(f"| (b) single-record latency p50 / p99 | {results['single']['p50_ms']:.2f} / {results['single']['p99_ms']:.2f} ms |")
    print(f"| (c) ceiling: clickhouse-connect `insert` of the same rows | {c:,.0f} rows/s |")
    print(f"| (c') ceiling: clickhouse-connect `raw_insert` JSONEachRow | {c_raw:,.0f} rows/s |")
    c_defaults = results["ceiling"]["raw_defaults_rows_per_s"]
    print(f"| (c'') the same with ClickHouse's default insert settings (optimize_on_insert=1) | {c_defaults:,.0f} rows/s |")
    print(f"| (c')/(c''): what the writer's insert settings gain | {c_raw / c_defaults:.2f} |")
    print(f"| (d) the same raw inserts into a copy of `requests` without its materialized views | {results['ceiling']['without_views_rows_per_s']:,.0f} rows/s |")
    print(f"| (a)/(c) | {a / c:.2f} |")
    print(f"| (a)/(c') | {a / c_raw:.2f} |")
    print(f"| RSS over {args.rss_seconds} s sustained load: first / peak / last sample | {rss[0] / 1024:.0f} / {max(rss) / 1024:.0f} / {rss[-1] / 1024:.0f} MiB |")
    print(f"| non-2xx answers / socket errors | {results['batch']['bad_status'] + results['single']['bad_status']} / {results['batch']['socket_errors'] + results['single']['socket_errors']} |")
    print()
    print("RSS samples (s, MiB):", ", ".join(f"{t:.0f}:{kib / 1024:.0f}" for t, kib in results["rss_kib"]))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
