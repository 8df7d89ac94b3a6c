"""Metrics benchmark: what the Prometheus metrics cost on the ingest path and at scrape time.

Measures in one run, in one process with prometheus-client's default values and again in a child
process in multiprocess mode (the mode exporter.wsgi runs under gunicorn):
  (a) ns per record of Metrics.observe_rows for batches of 1, 100 and 1,000 realistic records
      (the demo generator's orgs, models and status mix), next to ns per record of a whole
      POST /v1/requests of the same batch (parse, validate, spool append with fsync, metrics) and
      of the POST plus the writer's insert into embedded ClickHouse, and the metrics' share;
  (b) /metrics render time and size with about 1k, 10k and 50k series, text format and OpenMetrics.

Each number is the median of --repeat rounds, ingest and metrics interleaved, in CPU time of the
process (time.process_time) because the reference machine is shared and noisy; the ingest's wall
time (which includes waiting for fsync) is shown next to it.

Usage: .venv/bin/python bench/metrics.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH_SIZES = (1, 100, 1000)
SERIES_TARGETS = (1_000, 10_000, 50_000)
TEXT = "text/plain;version=0.0.4"
OPENMETRICS = "application/openmetrics-text;version=1.0.0"


def wire_records(count: int, seed: int) -> list[dict]:
    from exporter.demo import generate

    records = []
    for row in generate(count, 1.0, seed):
        record = {name: getattr(row, name) for name in row.__struct_fields__ if name not in ("timestamp", "request_id")}
        record["timestamp"] = time.time()
        records.append(record)
    return records


def median_ns_per_record(samples: list[float], records: int) -> float:
    return statistics.median(samples) / records * 1e9


def new_metrics(multiprocess_dir: Path | None, max_series: int = 1_000_000):
    from prometheus_client import CollectorRegistry

    from exporter.metrics import Metrics

    return Metrics(CollectorRegistry(auto_describe=True), max_series=max_series, multiprocess_dir=multiprocess_dir)


def bench_hot_path(repeat: int, multiprocess_dir: Path | None) -> list[dict]:
    """(a): observe_rows alone, and a whole ingest request, per record."""
    from exporter.app import create_app
    from exporter.config import load_config
    from exporter.records import parse_body

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, {"data_dir": tmp}, environ={})
        app = create_app(config, start_writer=False, metrics=new_metrics(multiprocess_dir))
        client = app.test_client()
        runtime = app.extensions["usage_exporter"]
        metrics = runtime.metrics
        for size in BATCH_SIZES:
            body = json.dumps(wire_records(size, seed=size)).encode()
            rows = parse_body(body, ndjson=False, max_records=size).rows
            # About 20k records per round, but no more than 1,000 requests.
            calls = min(1_000, max(20, 20_000 // size))
            metrics.observe_rows(rows)
            client.post("/v1/requests", data=body, content_type="application/json")
            wall, cpu, stored_cpu, observe = [], [], [], []
            for _ in range(repeat):
                started, started_cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    answer = client.post("/v1/requests", data=body, content_type="application/json")
                wall.append(time.perf_counter() - started)
                cpu.append(time.process_time() - started_cpu)
                assert answer.status_code == 202, answer.data
                # The rest of ingesting: the writer's inserts into (embedded, in-process) ClickHouse.
                assert runtime.writer.drain(time.monotonic() + 300), runtime.writer.status.last_error
                stored_cpu.append(time.process_time() - started_cpu)
                started_cpu = time.process_time()
                for _ in range(calls):
                    metrics.observe_rows(rows)
                observe.append(time.process_time() - started_cpu)
            records = calls * size
            ingest_cpu = median_ns_per_record(cpu, records)
            stored = median_ns_per_record(stored_cpu, records)
            observe_ns = median_ns_per_record(observe, records)
            results.append({
                "batch": size, "ingest_wall_ns": median_ns_per_record(wall, records), "ingest_cpu_ns": ingest_cpu,
                "stored_cpu_ns": stored, "metrics_ns": observe_ns, "share": observe_ns / ingest_cpu,
                "share_stored": observe_ns / stored,
            })
        runtime.spool.close()
        runtime.store.close()
    return results


def bench_render(repeat: int, target: int, multiprocess_dir: Path | None) -> list[dict]:
    """(b): render time and size for a registry holding about ``target`` series."""
    from exporter.records import Row

    metrics = new_metrics(multiprocess_dir)
    metrics.register_spool_gauges(lambda: (0, 0, 0.0), 1 << 30)
    baseline = _series_count(metrics)
    # One label set: requests, failed, input, output (4) + histogram (14 buckets, +Inf, count, sum).
    per_label_set = 4 + 17
    label_sets = max(1, (target - baseline) // per_label_set)
    rows = [
        Row(timestamp="2026-11-24 10:00:00.000", org=f"org-{i % 97}", model=f"model-{i}", endpoint="completion",
            status_code=200, response_time_ms=float(i % 5000), input_tokens=10, output_tokens=5)
        for i in range(label_sets)
    ]
    metrics.observe_rows(rows)
    series = _series_count(metrics)
    results = []
    for accept, name in ((TEXT, "text"), (OPENMETRICS, "openmetrics")):
        cpu, wall = [], []
        for _ in range(repeat):
            started, started_cpu = time.perf_counter(), time.process_time()
            body, _ = metrics.render(accept)
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started)
        results.append({"series": series, "format": name, "ms": statistics.median(cpu) * 1000,
                        "wall_ms": statistics.median(wall) * 1000, "bytes": len(body)})
    # The baseline: prometheus-client's own collection and text encoder for the same registry.
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = metrics.registry
    if multiprocess_dir is not None:
        metrics.refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))
    cpu, wall = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        body = generate_latest(registry)
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    results.append({"series": series, "format": "text, prometheus-client's encoder", "ms": statistics.median(cpu) * 1000,
                    "wall_ms": statistics.median(wall) * 1000, "bytes": len(body)})
    return results


def _series_count(metrics) -> int:
    body, _ = metrics.render(TEXT)
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def run_job(job: str, repeat: int, multiprocess_dir: Path | None) -> list[dict]:
    if job == "hot":
        return bench_hot_path(repeat, multiprocess_dir)
    return bench_render(max(3, repeat // 2), int(job.split(":")[1]), multiprocess_dir)


def in_child(job: str, repeat: int) -> list[dict]:
    """A job in a fresh interpreter with prometheus-client in multiprocess mode and empty value files."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=tmp)
        out = subprocess.run(
            [sys.executable, __file__, "--repeat", str(repeat), "--child", job], env=env, check=True, capture_output=True, text=True
        ).stdout
    return json.loads(out)


def print_tables(single: dict, multi: dict) -> None:
    print("\nmetric updates on the ingest path (ns per record, median; CPU time unless marked wall)")
    print("| mode | batch | POST, wall | POST, CPU | POST + insert into ClickHouse, CPU | metric updates, CPU "
          "| share of POST | share of POST + insert |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, data in (("one process", single), ("multiprocess", multi)):
        for row in data["hot_path"]:
            print(f"| {mode} | {row['batch']} | {row['ingest_wall_ns']:,.0f} | {row['ingest_cpu_ns']:,.0f} | "
                  f"{row['stored_cpu_ns']:,.0f} | {row['metrics_ns']:,.0f} | {row['share']:.1%} | {row['share_stored']:.1%} |")
    print("\n/metrics render (median)")
    print("| mode | series | format | render ms, CPU | render ms, wall | size |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for mode, data in (("one process", single), ("multiprocess", multi)):
        for row in data["render"]:
            print(f"| {mode} | {row['series']:,} | {row['format']} | {row['ms']:.1f} | {row['wall_ms']:.1f} | "
                  f"{row['bytes'] / 1024:,.0f} KiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per measurement; the median is reported (default 7)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        json.dump(run_job(args.child, args.repeat, Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])), sys.stdout)
        return
    single: dict[str, list] = {"hot_path": [], "render": []}
    multi: dict[str, list] = {"hot_path": [], "render": []}
    for job in ["hot"] + [f"render:{n}" for n in SERIES_TARGETS]:
        key = "hot_path" if job == "hot" else "render"
        single[key] += run_job(job, args.repeat, None)
        multi[key] += in_child(job, args.repeat)
    print_tables(single, multi)


if __name__ == "__main__":
    main()
