-- Rollups behind GET /api/v1/usage: per-minute aggregates kept by materialized views on requests.
-- Why they are exact (docs/schema.md has the whole argument):
--   * every measure is an integer sum (or a max), so adding minutes in any order gives the raw
--     numbers bit for bit; response times are summed as whole microseconds for that reason;
--   * each view sees every block inserted into requests exactly once: the writer drops repeated
--     request ids before inserting, and a replayed batch (same insert_deduplication_token) is
--     dropped in these tables too (deduplicate_blocks_in_dependent_materialized_views=1 on the
--     writer, non_replicated_deduplication_window on every target);
--   * the minutes cut by a window's second-exact start and end are read row by row from
--     usage_recent_requests, the last 8 days of requests ordered by time.
-- Tiers: whole UTC hours come from the *_1h tables, the whole minutes of the partial hours from
-- the *_1m tables, the partial minutes from usage_recent_requests (exporter/usage.py).
-- Reads must sum() the measures (rows of one key merge only eventually); never read them with
-- plain column values. Small granules (1024 rows) and small compressed blocks (8-64 KiB): a
-- scope reads short time ranges, one per org or token, and ClickHouse decompresses whole blocks,
-- so 1 MiB blocks would cost a megabyte per column and range (about 10 % more disk). The retention TTL (clickhouse.retention_days) is applied by the exporter
-- on the minute column (exporter/storage.py RETAINED_TABLES).

-- Per org, model and endpoint: the "all organizations" view and one org's metrics.
CREATE TABLE IF NOT EXISTS ${database}.usage_by_org_1m
(
    org           LowCardinality(String) COMMENT 'Organization',
    minute        DateTime('UTC')        COMMENT 'Start of the UTC minute the requests fall in',
    model         LowCardinality(String) COMMENT 'Model name as requested',
    endpoint      Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    requests      SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of requests',
    failed        SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests with status_code >= 400',
    rt_count      SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests that carry a response_time_ms',
    rt_sum_us     SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of response_time_ms in whole microseconds (integer, so sums are exact)',
    input_tokens  SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of input_tokens',
    output_tokens SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of output_tokens'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (org, minute, model, endpoint)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'Requests per minute, org, model and endpoint (rollup of requests; sum() the measures)';

-- Per token (with its owner and service account): one org's top tokens.
CREATE TABLE IF NOT EXISTS ${database}.usage_by_token_1m
(
    org             LowCardinality(String) COMMENT 'Organization',
    token_name      LowCardinality(String) COMMENT 'API token name',
    minute          DateTime('UTC')        COMMENT 'Start of the UTC minute the requests fall in',
    model           LowCardinality(String) COMMENT 'Model name as requested',
    endpoint        Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    token_owner     LowCardinality(String) COMMENT 'Token owner email as recorded',
    service_account LowCardinality(String) COMMENT 'Service account as recorded',
    requests        SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of requests',
    failed          SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests with status_code >= 400',
    rt_count        SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests that carry a response_time_ms',
    rt_sum_us       SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of response_time_ms in whole microseconds',
    input_tokens    SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of input_tokens',
    output_tokens   SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of output_tokens',
    last_seen       SimpleAggregateFunction(max, DateTime64(3, 'UTC')) COMMENT 'Latest timestamp of these requests (picks the current owner of a token)'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (org, token_name, minute, model, endpoint, token_owner, service_account)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'Requests per minute, org, token, model and endpoint (rollup of requests; sum() the measures)';

-- Every dimension the usage page filters or groups by: one token's top user ids, and everything a
-- user key sees (records whose token_owner or user_id is its email, or whose team is its team).
CREATE TABLE IF NOT EXISTS ${database}.usage_by_user_1m
(
    org             LowCardinality(String) COMMENT 'Organization',
    token_name      LowCardinality(String) COMMENT 'API token name',
    minute          DateTime('UTC')        COMMENT 'Start of the UTC minute the requests fall in',
    user_id         String                 COMMENT 'End-user id sent by the API caller',
    model           LowCardinality(String) COMMENT 'Model name as requested',
    endpoint        Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    token_owner     LowCardinality(String) COMMENT 'Token owner email as recorded',
    service_account LowCardinality(String) COMMENT 'Service account as recorded',
    team            LowCardinality(String) COMMENT 'Team that owns the service account',
    requests        SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of requests',
    failed          SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests with status_code >= 400',
    rt_count        SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests that carry a response_time_ms',
    rt_sum_us       SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of response_time_ms in whole microseconds',
    input_tokens    SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of input_tokens',
    output_tokens   SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of output_tokens',
    last_seen       SimpleAggregateFunction(max, DateTime64(3, 'UTC')) COMMENT 'Latest timestamp of these requests'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (org, token_name, minute, user_id, model, endpoint, token_owner, service_account, team)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'Requests per minute, org, token, user id, model, endpoint, owner and team (rollup of requests; sum() the measures)';

-- Per org, per UTC hour: the whole hours of 1d and 1w windows over all orgs.
CREATE TABLE IF NOT EXISTS ${database}.usage_by_org_1h
(
    org           LowCardinality(String) COMMENT 'Organization',
    hour          DateTime('UTC')        COMMENT 'Start of the UTC hour the requests fall in',
    model         LowCardinality(String) COMMENT 'Model name as requested',
    endpoint      Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    requests      SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of requests',
    failed        SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests with status_code >= 400',
    rt_count      SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests that carry a response_time_ms',
    rt_sum_us     SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of response_time_ms in whole microseconds',
    input_tokens  SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of input_tokens',
    output_tokens SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of output_tokens'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (org, hour, model, endpoint)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'Requests per UTC hour, org, model and endpoint (rollup of requests; sum() the measures)';

-- Per token, per UTC hour: the whole hours of one org's 1d and 1w windows. Ordered by hour before
-- token: its one reader wants every token of an org for a range of hours.
CREATE TABLE IF NOT EXISTS ${database}.usage_by_token_1h
(
    org             LowCardinality(String) COMMENT 'Organization',
    token_name      LowCardinality(String) COMMENT 'API token name',
    hour            DateTime('UTC')        COMMENT 'Start of the UTC hour the requests fall in',
    model           LowCardinality(String) COMMENT 'Model name as requested',
    endpoint        Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    token_owner     LowCardinality(String) COMMENT 'Token owner email as recorded',
    service_account LowCardinality(String) COMMENT 'Service account as recorded',
    requests        SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of requests',
    failed          SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests with status_code >= 400',
    rt_count        SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests that carry a response_time_ms',
    rt_sum_us       SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of response_time_ms in whole microseconds',
    input_tokens    SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of input_tokens',
    output_tokens   SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of output_tokens',
    last_seen       SimpleAggregateFunction(max, DateTime64(3, 'UTC')) COMMENT 'Latest timestamp of these requests'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (org, hour, token_name, model, endpoint, token_owner, service_account)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'Requests per UTC hour, org, token, model and endpoint (rollup of requests; sum() the measures)';

-- Every dimension, per UTC hour: the whole hours of one token's and of a user key's 1d and 1w windows.
CREATE TABLE IF NOT EXISTS ${database}.usage_by_user_1h
(
    org             LowCardinality(String) COMMENT 'Organization',
    token_name      LowCardinality(String) COMMENT 'API token name',
    hour            DateTime('UTC')        COMMENT 'Start of the UTC hour the requests fall in',
    user_id         String                 COMMENT 'End-user id sent by the API caller',
    model           LowCardinality(String) COMMENT 'Model name as requested',
    endpoint        Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    token_owner     LowCardinality(String) COMMENT 'Token owner email as recorded',
    service_account LowCardinality(String) COMMENT 'Service account as recorded',
    team            LowCardinality(String) COMMENT 'Team that owns the service account',
    requests        SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of requests',
    failed          SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests with status_code >= 400',
    rt_count        SimpleAggregateFunction(sum, UInt64) COMMENT 'Requests that carry a response_time_ms',
    rt_sum_us       SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of response_time_ms in whole microseconds',
    input_tokens    SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of input_tokens',
    output_tokens   SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of output_tokens',
    last_seen       SimpleAggregateFunction(max, DateTime64(3, 'UTC')) COMMENT 'Latest timestamp of these requests'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (org, token_name, hour, user_id, model, endpoint, token_owner, service_account, team)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'Requests per UTC hour, org, token, user id, model, endpoint, owner and team (rollup of requests; sum() the measures)';

-- The last 8 days of requests, one row each, ordered by time: the partial minutes at a window's
-- second-exact edges. requests is ordered by (org, token_name, timestamp), where one minute of all
-- orgs is a granule per token; here it is one or two granules. Rows older than 8 days at insert
-- are never needed (windows reach 7 days back) and are not copied, so history imports skip it.
CREATE TABLE IF NOT EXISTS ${database}.usage_recent_requests
(
    timestamp       DateTime64(3, 'UTC')   COMMENT 'When the gateway received the request',
    org             LowCardinality(String) COMMENT 'Organization',
    token_name      LowCardinality(String) COMMENT 'API token name',
    user_id         String                 COMMENT 'End-user id sent by the API caller',
    model           LowCardinality(String) COMMENT 'Model name as requested',
    endpoint        Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'Request kind',
    token_owner     LowCardinality(String) COMMENT 'Token owner email as recorded',
    service_account LowCardinality(String) COMMENT 'Service account as recorded',
    team            LowCardinality(String) COMMENT 'Team that owns the service account',
    failed          UInt8                  COMMENT '1 when status_code >= 400',
    rt_count        UInt8                  COMMENT '1 when the record carries a response_time_ms',
    rt_sum_us       UInt64                 COMMENT 'response_time_ms in whole microseconds, 0 when absent',
    input_tokens    UInt32                 COMMENT 'Input (prompt) tokens',
    output_tokens   UInt32                 COMMENT 'Output (completion) tokens'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY timestamp
TTL toDateTime(timestamp) + toIntervalDay(8)
-- Small granules: every read is two short time ranges.
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024, min_compress_block_size = 8192, max_compress_block_size = 65536
COMMENT 'The last 8 days of requests ordered by time, for the partial minutes at the usage windows'' edges';

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_by_org_1m_mv TO ${database}.usage_by_org_1m
AS SELECT
    org, toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute, model, endpoint,
    count() AS requests,
    countIf(status_code >= 400) AS failed,
    count(response_time_ms) AS rt_count,
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)) AS rt_sum_us,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens
FROM ${database}.requests
GROUP BY org, minute, model, endpoint;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_by_token_1m_mv TO ${database}.usage_by_token_1m
AS SELECT
    org, token_name, toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute, model, endpoint,
    token_owner, service_account,
    count() AS requests,
    countIf(status_code >= 400) AS failed,
    count(response_time_ms) AS rt_count,
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)) AS rt_sum_us,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    max(timestamp) AS last_seen
FROM ${database}.requests
GROUP BY org, token_name, minute, model, endpoint, token_owner, service_account;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_by_user_1m_mv TO ${database}.usage_by_user_1m
AS SELECT
    org, token_name, toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute, user_id, model, endpoint,
    token_owner, service_account, team,
    count() AS requests,
    countIf(status_code >= 400) AS failed,
    count(response_time_ms) AS rt_count,
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)) AS rt_sum_us,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    max(timestamp) AS last_seen
FROM ${database}.requests
GROUP BY org, token_name, minute, user_id, model, endpoint, token_owner, service_account, team;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_by_org_1h_mv TO ${database}.usage_by_org_1h
AS SELECT
    org, toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour, model, endpoint,
    count() AS requests,
    countIf(status_code >= 400) AS failed,
    count(response_time_ms) AS rt_count,
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)) AS rt_sum_us,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens
FROM ${database}.requests
GROUP BY org, hour, model, endpoint;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_by_token_1h_mv TO ${database}.usage_by_token_1h
AS SELECT
    org, token_name, toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour, model, endpoint,
    token_owner, service_account,
    count() AS requests,
    countIf(status_code >= 400) AS failed,
    count(response_time_ms) AS rt_count,
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)) AS rt_sum_us,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    max(timestamp) AS last_seen
FROM ${database}.requests
GROUP BY org, token_name, hour, model, endpoint, token_owner, service_account;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_by_user_1h_mv TO ${database}.usage_by_user_1h
AS SELECT
    org, token_name, toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour, user_id, model, endpoint,
    token_owner, service_account, team,
    count() AS requests,
    countIf(status_code >= 400) AS failed,
    count(response_time_ms) AS rt_count,
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)) AS rt_sum_us,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    max(timestamp) AS last_seen
FROM ${database}.requests
GROUP BY org, token_name, hour, user_id, model, endpoint, token_owner, service_account, team;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_recent_requests_mv TO ${database}.usage_recent_requests
AS SELECT
    timestamp, org, token_name, user_id, model, endpoint, token_owner, service_account, team,
    status_code >= 400 AS failed,
    response_time_ms IS NOT NULL AS rt_count,
    ifNull(toUInt64(round(response_time_ms * 1000)), 0) AS rt_sum_us,
    input_tokens, output_tokens
FROM ${database}.requests
WHERE timestamp >= now() - toIntervalDay(8);

-- Backfill: a database that held requests before these views existed gets its rollups filled
-- once, from requests, at the first migrate. It runs only while a rollup is empty and requests is
-- not, so it is a no-op on every later start (migrate runs before the writer inserts anything).
INSERT INTO ${database}.usage_by_org_1m
SELECT
    org, toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute, model, endpoint,
    count(), countIf(status_code >= 400), count(response_time_ms),
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)), sum(input_tokens), sum(output_tokens)
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_by_org_1m) = 0
GROUP BY org, minute, model, endpoint;

INSERT INTO ${database}.usage_by_token_1m
SELECT
    org, token_name, toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute, model, endpoint,
    token_owner, service_account,
    count(), countIf(status_code >= 400), count(response_time_ms),
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)), sum(input_tokens), sum(output_tokens), max(timestamp)
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_by_token_1m) = 0
GROUP BY org, token_name, minute, model, endpoint, token_owner, service_account;

INSERT INTO ${database}.usage_by_user_1m
SELECT
    org, token_name, toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute, user_id, model, endpoint,
    token_owner, service_account, team,
    count(), countIf(status_code >= 400), count(response_time_ms),
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)), sum(input_tokens), sum(output_tokens), max(timestamp)
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_by_user_1m) = 0
GROUP BY org, token_name, minute, user_id, model, endpoint, token_owner, service_account, team;

INSERT INTO ${database}.usage_by_org_1h
SELECT
    org, toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour, model, endpoint,
    count(), countIf(status_code >= 400), count(response_time_ms),
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)), sum(input_tokens), sum(output_tokens)
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_by_org_1h) = 0
GROUP BY org, hour, model, endpoint;

INSERT INTO ${database}.usage_by_token_1h
SELECT
    org, token_name, toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour, model, endpoint,
    token_owner, service_account,
    count(), countIf(status_code >= 400), count(response_time_ms),
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)), sum(input_tokens), sum(output_tokens), max(timestamp)
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_by_token_1h) = 0
GROUP BY org, token_name, hour, model, endpoint, token_owner, service_account;

INSERT INTO ${database}.usage_by_user_1h
SELECT
    org, token_name, toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour, user_id, model, endpoint,
    token_owner, service_account, team,
    count(), countIf(status_code >= 400), count(response_time_ms),
    sum(ifNull(toUInt64(round(response_time_ms * 1000)), 0)), sum(input_tokens), sum(output_tokens), max(timestamp)
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_by_user_1h) = 0
GROUP BY org, token_name, hour, user_id, model, endpoint, token_owner, service_account, team;

INSERT INTO ${database}.usage_recent_requests
SELECT
    timestamp, org, token_name, user_id, model, endpoint, token_owner, service_account, team,
    status_code >= 400, response_time_ms IS NOT NULL, ifNull(toUInt64(round(response_time_ms * 1000)), 0),
    input_tokens, output_tokens
FROM ${database}.requests
WHERE (SELECT count() FROM ${database}.usage_recent_requests) = 0 AND timestamp >= now() - toIntervalDay(8);
