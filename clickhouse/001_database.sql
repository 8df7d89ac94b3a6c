-- The database that holds everything the exporter writes. ${database} is clickhouse.database
-- (default llm_usage) or the database named in a server DSN.
CREATE DATABASE IF NOT EXISTS ${database} COMMENT 'LLM gateway usage: one row per gateway request, plus rollups and the model catalog';
