-- One row per gateway request the exporter accepted. Columns carry the record's field names.
-- ORDER BY (org, token_name, timestamp): the dashboards filter by org, then token, then time.
-- ingest_batch names the exporter batch (its de-duplication token) that stored each row, so a
-- batch whose insert was interrupted can be looked up here before it is sent again. requests keeps
-- no de-duplication window of its own: ClickHouse logs a token before it commits the part, so a
-- crash in between would make it refuse the retry of a batch it never stored. The views' target
-- tables keep theirs, and drop the blocks of a retried batch that already reached them; see
-- docs/durability.md.
CREATE TABLE IF NOT EXISTS ${database}.requests
(
    timestamp        DateTime64(3, 'UTC')           COMMENT 'When the gateway received the request (UTC, millisecond precision)',
    org              LowCardinality(String)         COMMENT 'Organization the API token belongs to',
    model            LowCardinality(String)         COMMENT 'Model name as requested',
    endpoint         Enum8('completion' = 1, 'embedding' = 2, 'other' = 3)
                                                    COMMENT 'Request kind: sent by the gateway or derived from path',
    status_code      UInt16                         COMMENT 'HTTP status the gateway returned; 0 = unknown (importers only)',
    path             LowCardinality(String)         COMMENT 'API path, e.g. /v1/chat/completions',
    method           LowCardinality(String)         COMMENT 'HTTP method',
    response_time_ms Nullable(Float64)              COMMENT 'Gateway response time in milliseconds; NULL when not reported',
    input_tokens     UInt32                         COMMENT 'Input (prompt) tokens',
    output_tokens    UInt32                         COMMENT 'Output (completion) tokens',
    token_name       LowCardinality(String)         COMMENT 'Name of the API token used',
    token_owner      LowCardinality(String)         COMMENT 'Email of the token owner; empty for service-account tokens',
    service_account  LowCardinality(String)         COMMENT 'Service account name, for service-account tokens',
    team             LowCardinality(String)         COMMENT 'Team that owns the service account',
    user_id          String                         COMMENT 'End-user id sent by the API caller (any string)',
    request_id       String                         COMMENT 'Gateway request id; a record repeated with the same id is stored once',
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3) COMMENT 'When the exporter wrote the row',
    ingest_batch     String DEFAULT getSetting('insert_deduplication_token')
                                                    COMMENT 'Exporter batch that stored the row (its de-duplication token); empty for rows written without one',
    failed           UInt8 ALIAS status_code >= 400 COMMENT '1 when status_code >= 400 (the dashboards'' "failed")',
    total_tokens     UInt64 ALIAS input_tokens + output_tokens COMMENT 'input_tokens + output_tokens',
    INDEX ingest_batch_idx ingest_batch TYPE bloom_filter GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (org, token_name, timestamp)
${retention_ttl}
COMMENT 'One row per LLM gateway request: who (org, token, user), what (model, endpoint), outcome (status, latency, tokens)';


-- A database created before ingest_batch existed gets it here (no-ops on a newer one). Its older
-- rows keep an empty ingest_batch and are trusted as stored.
ALTER TABLE ${database}.requests
    ADD COLUMN IF NOT EXISTS ingest_batch String DEFAULT getSetting('insert_deduplication_token')
        COMMENT 'Exporter batch that stored the row (its de-duplication token); empty for rows written without one'
        AFTER ingested_at;

ALTER TABLE ${database}.requests ADD INDEX IF NOT EXISTS ingest_batch_idx ingest_batch TYPE bloom_filter GRANULARITY 1;

ALTER TABLE ${database}.requests MODIFY SETTING non_replicated_deduplication_window = 0;
