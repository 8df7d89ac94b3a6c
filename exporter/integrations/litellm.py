"""A LiteLLM callback that sends one usage record per call to the exporter.

Enable it in the LiteLLM proxy's ``config.yaml`` (the package installed next to LiteLLM)::

    litellm_settings:
      callbacks: exporter.integrations.litellm.usage_exporter

``usage_exporter`` is created on first use from two environment variables, because LiteLLM builds
callbacks from an import path and passes no arguments: ``LLM_USAGE_EXPORTER_URL`` (default
``http://127.0.0.1:8080``) and ``LLM_USAGE_EXPORTER_TOKEN`` (an ingest token, when the exporter
requires one). For other settings make your own instance of :class:`UsageExporterCallback`.

The record comes from the call's ``StandardLoggingPayload`` (``kwargs["standard_logging_object"]``),
following its typed definition in LiteLLM 1.110.2 (``litellm/types/utils.py``):

===================  =====================================================================
record field         from the payload
===================  =====================================================================
``timestamp``        ``startTime``
``org``              the key's org (``metadata.user_api_key_org_alias``, else ``_org_id``),
                     else its team (alias, else id), else ``default_org``
``team``             ``metadata.user_api_key_team_alias``, else ``user_api_key_team_id``
``token_name``       ``metadata.user_api_key_alias`` (the key alias), else the key hash's
                     first 12 characters
``token_owner``      ``metadata.user_api_key_user_email``
``service_account``  ``metadata.user_api_key_auth_metadata.service_account_id`` (keys made by
                     LiteLLM's service-account endpoint)
``user_id``          ``end_user`` (the ``user`` the API caller sent to the proxy), else
                     ``metadata.user_api_key_end_user_id``, else ``model_parameters.user``
                     (SDK calls)
``model``            ``model_group`` (the name the caller asked for), else ``model``
``path``             ``metadata.user_api_key_request_route``, else the route of ``call_type``
``endpoint``         from ``call_type``: completions and responses, embeddings, or other
``status_code``      200 for ``status == "success"``; for failures
                     ``error_information.error_code`` when it is an HTTP status, else 500
``response_time_ms`` ``(endTime - startTime) * 1000``: the whole call, streams included
                     (LiteLLM's own ``response_time`` is time to first token for streams)
``input_tokens``,    ``prompt_tokens``, ``completion_tokens``
``output_tokens``
``request_id``       ``litellm-<id>``: LiteLLM calls both the sync and the async success hook
                     for some calls; the id makes the second one a no-op
===================  =====================================================================
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..client import UsageClient

# The contract's limits (exporter.records holds the same numbers), repeated so that this module,
# like the client, needs nothing beyond the standard library: `pip install --no-deps
# llm-usage-exporter` is enough in a LiteLLM image.
MAX_STRING_CHARS = 1024
MAX_REQUEST_ID_CHARS = 128

log = logging.getLogger(__name__)

try:  # LiteLLM is the host process; without it the class still works (tests, other hosts).
    from litellm.integrations.custom_logger import CustomLogger as _Base
except ImportError:  # pragma: no cover - which branch runs depends on the environment

    class _Base:  # type: ignore[no-redef]
        """The part of LiteLLM's ``CustomLogger`` this callback overrides."""

        def __init__(self, **kwargs: Any) -> None:
            pass


URL_ENV = "LLM_USAGE_EXPORTER_URL"
TOKEN_ENV = "LLM_USAGE_EXPORTER_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"

_COMPLETION_CALLS = {"completion", "text_completion", "responses"}
_ROUTES = {
    "completion": "/chat/completions",
    "text_completion": "/completions",
    "embedding": "/embeddings",
    "responses": "/responses",
    "image_generation": "/images/generations",
    "image_edit": "/images/edits",
    "transcription": "/audio/transcriptions",
    "speech": "/audio/speech",
    "moderation": "/moderations",
    "rerank": "/rerank",
}


def _call_kind(call_type: str | None) -> str:
    """``acompletion`` and ``completion`` are one kind: LiteLLM prefixes async calls with ``a``."""
    name = (call_type or "").lstrip("_")
    if name not in _ROUTES and name.startswith("a") and name[1:] in _ROUTES:
        name = name[1:]
    return name


def _text(value: Any, limit: int = MAX_STRING_CHARS) -> str:
    """A string field as the contract takes it: absent -> empty, longer than the limit -> cut."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return text[:limit]


def _status(payload: Mapping[str, Any]) -> int:
    if payload.get("status") != "failure":
        return 200
    code = str((payload.get("error_information") or {}).get("error_code") or "")
    return int(code) if code.isdigit() and 100 <= int(code) <= 599 else 500


def record_from_payload(payload: Mapping[str, Any], default_org: str = "litellm") -> dict[str, Any]:
    """The exporter record for one ``StandardLoggingPayload`` (see the module docstring's table)."""
    metadata: Mapping[str, Any] = payload.get("metadata") or {}
    auth_metadata = metadata.get("user_api_key_auth_metadata") or {}
    team = metadata.get("user_api_key_team_alias") or metadata.get("user_api_key_team_id")
    org = metadata.get("user_api_key_org_alias") or metadata.get("user_api_key_org_id") or team or default_org
    key_hash = metadata.get("user_api_key_hash") or ""
    kind = _call_kind(payload.get("call_type"))
    start = float(payload.get("startTime") or 0)
    end = float(payload.get("endTime") or start)
    return {
        "timestamp": start,
        "org": _text(org),
        "team": _text(team),
        "token_name": _text(metadata.get("user_api_key_alias") or key_hash[:12]),
        "token_owner": _text(metadata.get("user_api_key_user_email")),
        "service_account": _text(auth_metadata.get("service_account_id") if isinstance(auth_metadata, Mapping) else None),
        "user_id": _text(payload.get("end_user") or metadata.get("user_api_key_end_user_id")
                         or (payload.get("model_parameters") or {}).get("user")),
        "model": _text(payload.get("model_group") or payload.get("model")),
        "path": _text(metadata.get("user_api_key_request_route") or _ROUTES.get(kind, "")),
        "endpoint": "completion" if kind in _COMPLETION_CALLS else "embedding" if kind == "embedding" else "other",
        "method": "POST",
        "status_code": _status(payload),
        "response_time_ms": round(max(0.0, end - start) * 1000, 3),
        "input_tokens": max(0, int(payload.get("prompt_tokens") or 0)),
        "output_tokens": max(0, int(payload.get("completion_tokens") or 0)),
        "request_id": _text(f"litellm-{payload.get('id')}", MAX_REQUEST_ID_CHARS),
    }


class UsageExporterCallback(_Base):
    """A LiteLLM ``CustomLogger`` that hands every finished call's record to a :class:`UsageClient`."""

    def __init__(self, url: str | None = None, *, token: str | None = None, client: UsageClient | None = None,
                 default_org: str = "litellm", **client_options: Any) -> None:
        super().__init__()
        self.client = client or UsageClient(url or DEFAULT_URL, token=token, **client_options)
        self.default_org = default_org
        # Ids of the last calls sent, so the sync + async double call costs one record on the wire.
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def _handle(self, kwargs: Mapping[str, Any]) -> None:
        try:
            payload = kwargs.get("standard_logging_object")
            if not payload:
                log.debug("LiteLLM call without a standard_logging_object; nothing to record")
                return
            record = record_from_payload(payload, self.default_org)
            with self._lock:
                if record["request_id"] in self._recent:
                    return
                self._recent[record["request_id"]] = None
                if len(self._recent) > 10_000:
                    self._recent.popitem(last=False)
            self.client.send(record)
        except Exception:  # a logging callback must never fail the call it observes
            log.exception("could not build a usage record from LiteLLM's payload")

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._handle(kwargs)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._handle(kwargs)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._handle(kwargs)  # send() only buffers: safe on the event loop

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._handle(kwargs)


@functools.cache
def _default_callback() -> UsageExporterCallback:
    return UsageExporterCallback(os.environ.get(URL_ENV, DEFAULT_URL), token=os.environ.get(TOKEN_ENV) or None)


def __getattr__(name: str) -> Any:
    """``usage_exporter`` exists only once LiteLLM asks for it, so importing this module starts nothing."""
    if name == "usage_exporter":
        return _default_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
