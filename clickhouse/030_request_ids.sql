-- request_id -> first seen, kept by a materialized view so the writer can drop a repeated record
-- (a gateway retry) with a primary-key lookup instead of scanning requests.
CREATE TABLE IF NOT EXISTS ${database}.request_ids
(
    request_id String COMMENT 'Gateway request id already stored in requests',
    timestamp  DateTime64(3, 'UTC') COMMENT 'Timestamp of the stored record',
    ingest_batch String COMMENT 'Exporter batch that stored it (requests.ingest_batch)'
)
ENGINE = ReplacingMergeTree
ORDER BY request_id
${retention_ttl}
SETTINGS non_replicated_deduplication_window = 10000
COMMENT 'Index of request ids present in requests (used for de-duplication)';

-- A database created before ingest_batch existed: the column, and the view's query (no-ops on a
-- newer one).
ALTER TABLE ${database}.request_ids
    ADD COLUMN IF NOT EXISTS ingest_batch String COMMENT 'Exporter batch that stored it (requests.ingest_batch)';

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.request_ids_mv TO ${database}.request_ids
AS SELECT request_id, timestamp, ingest_batch FROM ${database}.requests WHERE request_id != '';

ALTER TABLE ${database}.request_ids_mv
    MODIFY QUERY SELECT request_id, timestamp, ingest_batch FROM ${database}.requests WHERE request_id != '';
