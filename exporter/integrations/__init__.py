"""Ways for gateways to get their records in, beyond ``POST /v1/requests``.

- :mod:`exporter.integrations.aqueduct`: imports an Aqueduct gateway's request log from its PostgreSQL.
- :mod:`exporter.integrations.litellm`: a LiteLLM proxy callback that sends each call's record.

Each one is imported on demand, so its optional dependency (psycopg, litellm) is only needed by those
who use it.
"""
