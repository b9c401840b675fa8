"""Alert delivery: alerts from Kafka to ClickHouse and to signed webhooks.

render (alert -> body) · sign (Standard Webhooks headers) · guard (SSRF) · deliver (one
endpoint, retries) · records (ClickHouse rows and queries) · worker (one endpoint's
queue) · dispatcher (Kafka consumer, fan-out, commits) · probe (`llmtap alerts test`).
"""
