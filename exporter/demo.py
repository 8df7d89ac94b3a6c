"""Realistic synthetic gateway traffic, so a newcomer sees a full dashboard at once.

Several organizations of different sizes, user tokens and service-account tokens with Zipf-like
popularity, end-user ids, a dozen models (completions and embeddings), a diurnal pattern, about
3 % failures, and latencies and token counts that depend on the model.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .config import ModelEntry
from .records import Row, format_timestamp

ORGS = [
    ("tu-wien", 0.34, "tuwien.ac.at"),
    ("acme", 0.22, "acme.org"),
    ("datalab", 0.16, "datalab.example"),
    ("globex", 0.11, "globex.com"),
    ("initech", 0.08, "initech.io"),
    ("umbrella", 0.05, "umbrella.health"),
    ("hooli", 0.04, "hooli.xyz"),
]

# name, endpoint, popularity weight, median latency ms, mean input tokens, mean output tokens
MODELS = [
    ("gpt-4o", "completion", 0.20, 1800, 900, 350),
    ("gpt-4o-mini", "completion", 0.22, 700, 700, 250),
    ("claude-sonnet-4", "completion", 0.10, 2400, 1500, 500),
    ("llama-3.3-70b-instruct", "completion", 0.09, 1500, 800, 300),
    ("qwen2.5-coder-32b", "completion", 0.07, 1200, 1200, 400),
    ("mistral-large", "completion", 0.05, 1600, 600, 250),
    ("deepseek-r1", "completion", 0.04, 9000, 1000, 1800),
    ("gemma-3-27b", "completion", 0.03, 900, 500, 200),
    ("text-embedding-3-small", "embedding", 0.12, 60, 300, 0),
    ("text-embedding-3-large", "embedding", 0.05, 110, 400, 0),
    ("bge-m3", "embedding", 0.03, 45, 250, 0),
]
# Configured but never used by the demo: shows up with 0 requests on "Requests by Model".
UNUSED_MODELS = [("whisper-large-v3", "other"), ("o3-pro", "completion")]

FIRST_NAMES = ["anna", "ben", "chen", "dana", "emil", "fatima", "georg", "hana", "ivan", "julia", "karl", "lea"]
SERVICE_ACCOUNTS = ["ci-bot", "rag-indexer", "support-assistant", "nightly-eval", "translation-svc"]
TEAMS = ["ml-team", "platform", "research", "support"]
PATHS = {"completion": ["/v1/chat/completions", "/v1/completions"], "embedding": ["/v1/embeddings"], "other": ["/v1/audio/transcriptions"]}
FAILURE_CODES = [(400, 0.25), (401, 0.08), (404, 0.05), (413, 0.04), (429, 0.30), (500, 0.12), (502, 0.08), (503, 0.05), (504, 0.03)]


def catalog() -> list[ModelEntry]:
    """The model catalog the demo's data matches, unused models included."""
    entries = [ModelEntry(name=m[0], endpoint=m[1]) for m in MODELS]
    entries += [ModelEntry(name=name, endpoint=endpoint) for name, endpoint in UNUSED_MODELS]
    return entries


@dataclass(frozen=True)
class Token:
    org: str
    name: str
    owner: str
    service_account: str
    team: str
    users: tuple[str, ...]


def _tokens(rng: random.Random) -> dict[str, list[Token]]:
    tokens: dict[str, list[Token]] = {}
    for org, weight, domain in ORGS:
        count = max(3, int(weight * 40))
        org_tokens = []
        for index in range(count):
            if index % 4 == 3:
                account = rng.choice(SERVICE_ACCOUNTS)
                name, owner, team = f"{account}-{index}", "", rng.choice(TEAMS)
            else:
                person = FIRST_NAMES[(index + len(org)) % len(FIRST_NAMES)]
                name, owner, account, team = f"{person}-{index}", f"{person}.{index}@{domain}", "", ""
            users = tuple(
                rng.choice([f"user-{rng.randrange(10_000):04d}", f"{rng.choice(FIRST_NAMES)}@{domain}", f"u-{rng.getrandbits(48):012x}"])
                for _ in range(rng.randint(0, 12))
            )
            org_tokens.append(Token(org, name, owner, account, team, users))
        tokens[org] = org_tokens
    return tokens


def _diurnal_weight(hour: float) -> float:
    # Busy in working hours (peak around 14:00 UTC), quiet at night, never zero.
    return 0.15 + math.exp(-((hour - 14.0) ** 2) / 18.0)


def generate(events: int, days: float, seed: int, now: float | None = None) -> Iterator[Row]:
    """``events`` rows spread over the last ``days`` days, oldest first. Deterministic per seed and now."""
    rng = random.Random(seed)
    now = time.time() if now is None else now
    start = now - days * 86_400
    tokens = _tokens(rng)
    org_names = [o[0] for o in ORGS]
    org_weights = [o[1] for o in ORGS]
    model_weights = [m[2] for m in MODELS]
    failure_codes = [c for c, _ in FAILURE_CODES]
    failure_weights = [w for _, w in FAILURE_CODES]
    # Zipf-like token popularity inside each org.
    token_weights = {org: [1.0 / (rank + 1) ** 1.1 for rank in range(len(ts))] for org, ts in tokens.items()}

    # Draw timestamps by rejection sampling against the diurnal curve, then sort.
    stamps: list[float] = []
    while len(stamps) < events:
        candidate = rng.uniform(start, now)
        hour = (candidate % 86_400) / 3600.0
        if rng.random() * 1.15 <= _diurnal_weight(hour):
            stamps.append(candidate)
    stamps.sort()

    for index, stamp in enumerate(stamps):
        org = rng.choices(org_names, org_weights)[0]
        token = rng.choices(tokens[org], token_weights[org])[0]
        name, endpoint, _, median_ms, mean_in, mean_out = rng.choices(MODELS, model_weights)[0]
        failed = rng.random() < 0.03
        status = rng.choices(failure_codes, failure_weights)[0] if failed else 200
        latency = median_ms * math.exp(rng.gauss(0, 0.55))
        if failed and status in (400, 401, 404, 413, 429):
            latency = rng.uniform(3, 40)
        input_tokens = 0 if failed else max(1, int(rng.expovariate(1 / mean_in)))
        output_tokens = 0 if failed or not mean_out else max(1, int(rng.expovariate(1 / mean_out)))
        yield Row(
            timestamp=format_timestamp(int(stamp * 1000)),
            org=org,
            model=name,
            endpoint=endpoint,
            status_code=status,
            path=rng.choice(PATHS[endpoint]),
            method="POST",
            # A few gateways do not report latency for every request.
            response_time_ms=None if rng.random() < 0.01 else round(latency, 3),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            token_name=token.name,
            token_owner=token.owner,
            service_account=token.service_account,
            team=token.team,
            user_id=rng.choice(token.users) if token.users and rng.random() < 0.8 else "",
            request_id=f"demo-{seed}-{int(now)}-{index}",
        )
