"""The LiteLLM callback: real StandardLoggingPayloads in, records a real exporter stores out.

``fixtures/litellm_payloads.json`` holds payloads that LiteLLM 1.110.2 itself built (its
``litellm.completion`` / ``acompletion`` / ``embedding`` with ``mock_response``, with proxy key
metadata), each with the hook LiteLLM called. LiteLLM is not a test dependency (it brings ~40
packages); the fixture and the key list below tie these tests to its typed definition.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import exporter.integrations.litellm as integration
from exporter.client import UsageClient
from exporter.integrations.litellm import UsageExporterCallback, record_from_payload

FIXTURE = Path(__file__).parent / "fixtures" / "litellm_payloads.json"
# StandardLoggingPayload's keys in litellm/types/utils.py of LiteLLM 1.110.2, without the
# NotRequired ones (cost_finalized, zero_cost_diagnostic, request_model_access_groups) and the
# optional ClassifierAudit base.
REQUIRED_KEYS = {
    "id", "trace_id", "session_id", "litellm_call_id", "call_type", "stream", "response_cost", "cost_breakdown",
    "autorouter_savings", "autorouter_savings_estimate", "autorouter_baseline_observation",
    "response_cost_failure_debug_info", "status", "status_fields", "custom_llm_provider", "total_tokens",
    "prompt_tokens", "completion_tokens", "startTime", "endTime", "completionStartTime", "response_time",
    "model_map_information", "model", "model_id", "model_group", "api_base", "metadata", "cache_hit", "cache_key",
    "saved_cache_cost", "request_tags", "end_user", "requester_ip_address", "user_agent", "messages", "response",
    "error_str", "error_information", "model_parameters", "hidden_params", "guardrail_information",
    "standard_built_in_tools_params",
}
# StandardLoggingUserAPIKeyMetadata's keys (the proxy's key information inside metadata).
KEY_METADATA = {
    "user_api_key_hash", "user_api_key_alias", "user_api_key_spend", "user_api_key_max_budget",
    "user_api_key_budget_reset_at", "user_api_key_user_spend", "user_api_key_user_max_budget",
    "user_api_key_team_spend", "user_api_key_team_max_budget", "user_api_key_org_id", "user_api_key_org_alias",
    "user_api_key_team_id", "user_api_key_project_id", "user_api_key_project_alias", "user_api_key_user_id",
    "user_api_key_user_email", "user_api_key_team_alias", "user_api_key_end_user_id", "user_api_key_request_route",
    "user_api_key_auth_metadata",
}


def calls() -> dict[str, list[dict[str, Any]]]:
    return {name: items for name, items in json.loads(FIXTURE.read_text(encoding="utf-8")).items() if not name.startswith("_")}


def payload(name: str) -> dict[str, Any]:
    return calls()[name][0]["payload"]


USER_KEY = {"org": "Technische Universität Wien", "team": "Forschung & Lehre", "token_name": "jürgens-laptop",
            "token_owner": "jürgen.müller@tuwien.ac.at", "service_account": "", "method": "POST"}


def expected(name: str, **fields: Any) -> dict[str, Any]:
    p = payload(name)
    return {"timestamp": p["startTime"], "request_id": f"litellm-{p['id']}",
            "response_time_ms": round((p["endTime"] - p["startTime"]) * 1000, 3),
            "input_tokens": p["prompt_tokens"], "output_tokens": p["completion_tokens"]} | fields


CASES = {
    "completion_success": expected("completion_success", **USER_KEY, user_id="ユーザー7", model="gpt-4o",
                                   path="/v1/chat/completions", endpoint="completion", status_code=200),
    "completion_stream": expected("completion_stream", **USER_KEY, user_id="", model="gpt-4o-mini",
                                  path="/v1/chat/completions", endpoint="completion", status_code=200),
    "acompletion_success": expected("acompletion_success", **USER_KEY, user_id="ユーザー7", model="gpt-4o",
                                    path="/v1/chat/completions", endpoint="completion", status_code=200),
    # A service-account key of a team in no org: the team stands in for the org.
    "embedding_service_account": expected(
        "embedding_service_account", org="Forschung & Lehre", team="Forschung & Lehre", token_name="indexer-key",
        token_owner="", service_account="rag-indexer", method="POST", user_id="", model="text-embedding-3-small",
        path="/v1/embeddings", endpoint="embedding", status_code=200),
    "completion_rate_limited": expected("completion_rate_limited", **USER_KEY, user_id="", model="gpt-4o",
                                        path="/v1/chat/completions", endpoint="completion", status_code=429),
    "acompletion_failure": expected("acompletion_failure", **USER_KEY, user_id="", model="gpt-4o",
                                    path="/v1/chat/completions", endpoint="completion", status_code=500),
}


def test_fixture_payloads_have_litellms_typed_shape():
    for name, items in calls().items():
        for item in items:
            p = item["payload"]
            assert REQUIRED_KEYS <= p.keys(), (name, REQUIRED_KEYS - p.keys())
            assert KEY_METADATA <= p["metadata"].keys(), name
            assert p["status"] in ("success", "failure")
    assert [item["hook"] for item in calls()["acompletion_failure"]] == ["async-failure"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_payload_maps_to_the_contracts_record(name):
    assert record_from_payload(payload(name)) == CASES[name]


def test_missing_identity_falls_back_without_inventing_data():
    p = payload("completion_success")
    bare = p | {"metadata": {k: None for k in p["metadata"]}, "model_group": "public-gpt", "call_type": "aembedding",
                "model_parameters": {}, "end_user": "end-7"}
    record = record_from_payload(bare, default_org="gateway")
    assert (record["org"], record["team"], record["token_name"], record["token_owner"]) == ("gateway", "", "", "")
    assert (record["model"], record["path"], record["endpoint"], record["user_id"]) == ("public-gpt", "/embeddings", "embedding", "end-7")
    hashed = record_from_payload(p | {"metadata": p["metadata"] | {"user_api_key_alias": None}})
    assert hashed["token_name"] == p["metadata"]["user_api_key_hash"][:12]
    long = record_from_payload(p | {"end_user": "x" * 5000})
    assert len(long["user_id"]) == 1024
    no_code = record_from_payload(payload("completion_rate_limited") | {"error_information": {"error_code": ""}})
    assert no_code["status_code"] == 500


def test_callback_sends_each_call_once_to_a_real_exporter(exporter_process, tmp_path):
    proc = exporter_process()
    callback = UsageExporterCallback(proc.url, max_batch_age_s=0.05)

    async def async_hooks() -> None:
        for items in calls().values():
            for item in items:
                kwargs = {"standard_logging_object": item["payload"], "litellm_call_id": item["payload"]["litellm_call_id"]}
                hook = item["hook"]
                # LiteLLM calls hooks with keywords; some calls reach both the sync and the async hook.
                args = {"kwargs": kwargs, "response_obj": None, "start_time": None, "end_time": None}
                if hook.endswith("success"):
                    callback.log_success_event(**args)
                    await callback.async_log_success_event(**args)
                else:
                    callback.log_failure_event(**args)
                    await callback.async_log_failure_event(**args)
        callback.log_success_event(kwargs={}, response_obj=None, start_time=None, end_time=None)  # no payload: ignored
        callback.log_failure_event(kwargs={"standard_logging_object": {"startTime": "garbage"}}, response_obj=None,
                                   start_time=None, end_time=None)  # unreadable: logged, never raised

    asyncio.run(async_hooks())
    assert callback.client.flush(timeout=30)
    assert (callback.client.stats.sent, callback.client.stats.rejected, callback.client.stats.failed) == (len(CASES), 0, 0)
    deadline = time.monotonic() + 30
    while int(proc.sql("SELECT count() AS n FROM requests")[0]["n"]) < len(CASES) and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = proc.sql(
        "SELECT request_id, org, team, token_name, token_owner, service_account, user_id, model, path, "
        "toString(endpoint) AS endpoint, status_code, response_time_ms, input_tokens, output_tokens, "
        "toUnixTimestamp64Milli(timestamp) AS ms FROM requests"
    )
    assert len(rows) == len(CASES)
    by_id = {row["request_id"]: row for row in rows}
    for want in CASES.values():
        row = by_id[want["request_id"]]
        for field in ("org", "team", "token_name", "token_owner", "service_account", "user_id", "model", "path", "endpoint"):
            assert row[field] == want[field], field
        assert row["status_code"] == want["status_code"]
        assert row["response_time_ms"] == pytest.approx(want["response_time_ms"], abs=1e-3)
        assert (row["input_tokens"], row["output_tokens"]) == (want["input_tokens"], want["output_tokens"])
        assert int(row["ms"]) == round(want["timestamp"] * 1000)
    callback.client.close()


def test_module_attribute_is_built_from_the_environment_on_first_use(monkeypatch):
    monkeypatch.setenv(integration.URL_ENV, "http://exporter.internal:9000/")
    monkeypatch.setenv(integration.TOKEN_ENV, "ingest-secret")
    integration._default_callback.cache_clear()
    try:
        callback = integration.usage_exporter
        assert callback is integration.usage_exporter
        assert isinstance(callback.client, UsageClient)
        assert callback.client.endpoint == "http://exporter.internal:9000/v1/requests"
        assert callback.client._headers["Authorization"] == "Bearer ingest-secret"
        callback.client.close(timeout=0)
    finally:
        integration._default_callback.cache_clear()
    with pytest.raises(AttributeError):
        integration.no_such_thing  # noqa: B018


def test_the_callback_needs_only_the_standard_library():
    """A LiteLLM image gets it with `pip install --no-deps llm-usage-exporter`: no msgspec, Flask or ClickHouse."""
    probe = ("import sys, exporter.integrations.litellm as m; "
             "heavy = [n for n in ('msgspec', 'flask', 'clickhouse_connect', 'yaml', 'psycopg', 'prometheus_client') if n in sys.modules]; "
             "print(heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_limits_match_the_records_module():
    from exporter.records import MAX_REQUEST_ID_CHARS, MAX_STRING_CHARS

    assert (integration.MAX_STRING_CHARS, integration.MAX_REQUEST_ID_CHARS) == (MAX_STRING_CHARS, MAX_REQUEST_ID_CHARS)
