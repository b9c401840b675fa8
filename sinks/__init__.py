"""Sinks: what leaves the stream for good (ClickHouse rows; later, webhooks)."""
