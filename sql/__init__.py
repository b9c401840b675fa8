"""ClickHouse: schema migrations, queries, the store client, and the analytics API."""
