"""Soak: a real exporter under steady mixed valid/invalid load, watched for leaks (not part of CI).

Runs ``usage-exporter serve`` on 127.0.0.1 and sends records at a steady rate for ``--minutes``:
batches where one record in ten is invalid, whole bodies that are not JSON, unsupported content
types, wrong ingest tokens, NDJSON bodies, retried batches (same request ids), and a usage query
and a scrape now and then. Every ``--interval`` seconds it samples the process's RSS, its open
files (/proc/PID/fd, with chDB's per-thread /proc statistics files counted apart) and the spool
(bytes on disk, and records not yet in ClickHouse), then prints a table and checks that each stays
flat: the average of the last quarter of the samples (after ``--warmup`` seconds) within
``--tolerance`` of the first quarter's for RSS (25% for open files, whose single samples jump
while a merge runs), the spool within two segments and three seconds of load. At the end the load
stops, the backlog drains, and ClickHouse must hold exactly the acknowledged records (one per
request id); SIGTERM must exit 0.

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--rate 300] [--interval 10]
Exit status 0 when everything held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
TOKEN = "soak-ingest-token"
ADMIN = "soak-admin-key"
BATCH = 30  # records per request: 10 requests/s at the default 300 records/s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Tally:
    """What the load generator sent and what the exporter answered."""

    acknowledged: set[str] = field(default_factory=set)  # request ids answered 202
    accepted: int = 0
    rejected_records: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, status: int) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1


def batch(sequence: int, now: float) -> list[dict]:
    """BATCH records, one in ten invalid in a different way each time."""
    records = []
    for i in range(BATCH):
        n = sequence * BATCH + i
        record = {
            "timestamp": now - (n % 50) / 10,
            "org": f"org-{n % 7}",
            "model": ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"][n % 3],
            "status_code": 200 if n % 13 else 500,
            "path": "/v1/embeddings" if n % 3 == 2 else "/v1/chat/completions",
            "response_time_ms": 100 + n % 900,
            "input_tokens": n % 2000,
            "output_tokens": n % 700,
            "token_name": f"token-{n % 11}",
            "user_id": f"user-{n % 97}@example.org",
            "request_id": f"soak-{n}",
        }
        if i % 10 == 9:
            broken = [("status_code", 0), ("timestamp", "yesterday"), ("org", ""), ("input_tokens", -1)][sequence % 4]
            record[broken[0]] = broken[1]
        records.append(record)
    return records


def send(session: requests.Session, url: str, tally: Tally, sequence: int, previous: list[dict] | None) -> list[dict]:
    """One request of the mix; returns the batch it sent (for a later retry)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    kind = sequence % 20
    records = batch(sequence, time.time())
    try:
        if kind == 3:
            answer = session.post(url + "/v1/requests", data=b"this is not json", headers=auth | {"Content-Type": "application/json"}, timeout=30)
        elif kind == 7:
            answer = session.post(url + "/v1/requests", data=b"a,b,c", headers=auth | {"Content-Type": "text/csv"}, timeout=30)
        elif kind == 11:
            answer = session.post(url + "/v1/requests", json=records, headers={"Authorization": "Bearer wrong"}, timeout=30)
        elif kind == 13 and previous is not None:
            records = previous  # a gateway retrying a batch it did not see answered: counted once
            answer = session.post(url + "/v1/requests", json=records, headers=auth, timeout=30)
        elif kind in (5, 15):
            body = "\n".join(json.dumps(r) for r in records) + "\n"
            answer = session.post(url + "/v1/requests", data=body.encode(), headers=auth | {"Content-Type": "application/x-ndjson"}, timeout=30)
        else:
            answer = session.post(url + "/v1/requests", json=records, headers=auth, timeout=30)
    except requests.RequestException:
        with tally.lock:
            tally.errors += 1
        return records
    tally.count(answer.status_code)
    if answer.status_code in (202, 400) and "accepted" in answer.text:
        payload = answer.json()
        rejected = {r["index"] for r in payload["rejected"]}
        with tally.lock:
            tally.accepted += payload["accepted"]
            tally.rejected_records += len(rejected)
            if answer.status_code == 202:
                tally.acknowledged.update(r["request_id"] for i, r in enumerate(records) if i not in rejected)
    return records


def load(url: str, rate: float, stop: threading.Event, tally: Tally) -> None:
    """A steady rate: each request leaves at its scheduled time, whatever the previous one took."""
    session = requests.Session()
    interval = BATCH / rate
    started = time.monotonic()
    previous = None
    for sequence in itertools.count():
        if stop.is_set():
            return
        delay = started + sequence * interval - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        previous = send(session, url, tally, sequence, previous)
        if sequence % 50 == 25:  # a reader now and then: the dashboard's query and a scrape
            for path in ("/api/v1/usage?timeframe=1h", "/metrics"):
                try:
                    tally.count(session.get(url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).status_code)
                except requests.RequestException:
                    with tally.lock:
                        tally.errors += 1


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    proc_fds: int  # of those, chDB's per-thread /proc/self/task/*/{stat,schedstat,io}: three per live thread
    threads: int
    spool_disk_mb: float
    spool_records: int
    acknowledged: int


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} in /proc/{pid}/status")


def open_files(pid: int) -> tuple[int, int]:
    """All open descriptors, and those that are ClickHouse's per-thread statistics files."""
    total = proc = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed between the listing and the look
            continue
        total += 1
        proc += target.startswith("/proc/")
    return total, proc


def disk_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def sample(pid: int, url: str, spool_dir: Path, t: float, tally: Tally) -> Sample:
    ready = requests.get(url + "/readyz", timeout=30).json()
    with tally.lock:
        acknowledged = len(tally.acknowledged)
    fds, proc_fds = open_files(pid)
    return Sample(t, status_field(pid, "VmRSS") / 1024, fds, proc_fds, status_field(pid, "Threads"), disk_mb(spool_dir),
                  ready["spool"]["records"], acknowledged)


def flat(values: list[float], tolerance: float) -> tuple[bool, float, float]:
    quarter = max(1, len(values) // 4)
    first, last = statistics.fmean(values[:quarter]), statistics.fmean(values[-quarter:])
    return last <= first * (1 + tolerance) + 1e-9, first, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=300.0, help="records per second")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    # ClickHouse's global thread pool grows once, about four minutes in (45 -> ~170 threads here), and
    # keeps its idle threads; RSS rises with it. The checks start after that step.
    parser.add_argument("--warmup", type=float, default=300.0, help="seconds before the first sample that counts")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth of RSS, last quarter over first")
    parser.add_argument("--segment-mb", type=int, default=4, help="spool segment size; the disk holds about two")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="usage-soak-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "ingest": {"tokens": [TOKEN]},
        "viewers": [{"key": ADMIN, "role": "admin"}],
        "spool": {"segment_bytes": args.segment_mb * 2**20},
        "log_level": "WARNING",
    }))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "exporter.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("USAGE_EXPORTER_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "exporter.cli", "serve", "--config", str(config), "--data-dir", str(work / "data"),
                                 "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(errors="replace"), file=sys.stderr)
                return 1
            time.sleep(0.2)

        tally, stop = Tally(), threading.Event()
        loader = threading.Thread(target=load, args=(url, args.rate, stop, tally), daemon=True)
        started = time.monotonic()
        loader.start()
        samples: list[Sample] = []
        print(f"soak: {args.minutes:g} min at {args.rate:g} records/s, sampling every {args.interval:g} s (pid {proc.pid})")
        print("| t (s) | RSS (MB) | open files | of which /proc (chDB threads) | threads | spool on disk (MB) | spool records | acknowledged |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        end = started + args.minutes * 60
        next_at = started + args.interval
        while next_at <= end + 1e-6:
            time.sleep(max(0.0, next_at - time.monotonic()))
            s = sample(proc.pid, url, work / "data" / "spool", next_at - started, tally)
            samples.append(s)
            print(f"| {s.t:.0f} | {s.rss_mb:.1f} | {s.fds} | {s.proc_fds} | {s.threads} | {s.spool_disk_mb:.2f} | {s.spool_records} "
                  f"| {s.acknowledged} |", flush=True)
            next_at += args.interval
        stop.set()
        loader.join(timeout=60)
        elapsed = time.monotonic() - started

        # The backlog drains by itself; then the store must hold every acknowledged id once.
        drain_deadline = time.monotonic() + 120
        while requests.get(url + "/readyz", timeout=30).json()["spool"]["records"] and time.monotonic() < drain_deadline:
            time.sleep(0.5)
        stored = requests.post(url + "/api/v1/sql", data="SELECT count(), uniqExact(request_id) FROM requests FORMAT JSONCompact",
                               headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60).json()["data"][0]
        stored_rows, stored_ids = int(stored[0]), int(stored[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = -9

    counted = [s for s in samples if s.t >= args.warmup] or samples
    checks = []
    ok, first, last = flat([s.rss_mb for s in counted], args.tolerance)
    checks.append((f"RSS flat: last quarter {last:.1f} MB vs first {first:.1f} MB (+{args.tolerance:.0%} allowed)", ok))
    # Merges and inserts open part files for a moment, so single samples jump; the averages may not.
    ok, first, last = flat([float(s.fds - s.proc_fds) for s in counted], 0.25)
    checks.append((f"open files (sockets, spool, parts) flat: last quarter {last:.0f} vs first {first:.0f} (+25% allowed)", ok))
    # ClickHouse keeps three statistics files open per thread that ran a query: bounded by the threads.
    bounded = f"at most {max(s.proc_fds for s in counted)}, 3 x {max(s.threads for s in counted)} threads"
    checks.append((f"per-thread /proc files bounded by the threads: {bounded}", all(s.proc_fds <= 3 * s.threads for s in counted)))
    ok, first, last = flat([float(s.threads) for s in counted], 0.10)
    checks.append((f"threads flat: last quarter {last:.0f} vs first {first:.0f}", ok))
    disk_bound = 2 * args.segment_mb + 1
    disk = [s.spool_disk_mb for s in counted]
    checks.append((f"spool on disk bounded: at most {max(disk):.2f} MB (two segments: {disk_bound} MB)", max(disk) <= disk_bound))
    backlog = [s.spool_records for s in counted]
    checks.append((f"spool backlog flat: at most {max(backlog)} records (under {3 * args.rate:.0f}, three seconds of load)",
                   max(backlog) <= 3 * args.rate))
    acknowledged = len(tally.acknowledged)
    checks.append((f"store holds every acknowledged record once: {stored_rows} rows, {stored_ids} ids, {acknowledged} acknowledged",
                   stored_rows == stored_ids == acknowledged))
    checks.append((f"no server error and no failed request: statuses {dict(sorted(tally.statuses.items()))}, {tally.errors} errors",
                   not any(code >= 500 for code in tally.statuses) and tally.errors == 0))
    checks.append((f"SIGTERM exit code {exit_code}", exit_code == 0))
    print()
    print(f"sent {args.rate:g} records/s for {elapsed:.0f} s: {tally.accepted} accepted ({tally.accepted / elapsed:.0f}/s), "
          f"{tally.rejected_records} rejected, {acknowledged} distinct request ids acknowledged")
    for text, passed in checks:
        print(f"- [{'x' if passed else ' '}] {text}")
    if all(passed for _, passed in checks):
        print("soak: everything held")
        return 0
    print(f"soak: FAILED (exporter log: {log_path})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
