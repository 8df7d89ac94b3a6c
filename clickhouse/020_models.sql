-- The model catalog from the config key `models`: listed on the dashboards with 0 requests when unused.
-- The exporter rewrites it at start-up (usage-exporter migrate / serve).
CREATE TABLE IF NOT EXISTS ${database}.models
(
    model    String COMMENT 'Model name as the gateway reports it',
    endpoint Enum8('completion' = 1, 'embedding' = 2, 'other' = 3) COMMENT 'What kind of requests the model serves'
)
ENGINE = MergeTree
ORDER BY model
COMMENT 'Configured model catalog (config key models)';
