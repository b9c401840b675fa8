"""Kafka -> ClickHouse: decode -> batch -> write -> commit, commit always last."""
