"""Columns as a ClickHouse ``Native`` insert body, built without a connection.

The writer's decode processes build the body of the ``calls`` insert themselves, so the
store process, the writer's busiest, only sends bytes (sinks/clickhouse/decode.py). The
body is clickhouse-connect's own encoding of the columns (what its ``insert`` sends,
before compression), of the types given by name (the table's, from
``Store.column_types``, or others for ClickHouse to convert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.driver.insert import InsertContext
from clickhouse_connect.driver.transform import NativeTransform


def native_body(
    table: str, names: Sequence[str], types: Sequence[str], columns: Sequence[Sequence[Any]]
) -> bytes:
    """The ``Native`` body inserting ``columns`` (``names`` order, of ``types``)."""
    context = InsertContext(
        table, list(names), [get_from_name(kind) for kind in types], columns, column_oriented=True
    )
    body = b"".join(NativeTransform.build_insert(context))
    if context.insert_exception is not None:  # the encoder logs it and writes a marker
        raise context.insert_exception
    # Before the first block: the statement an insert over HTTP sends in its body. An
    # insert of a prepared body states its own.
    if body.startswith(b"INSERT INTO "):
        body = body[body.index(b"\n") + 1 :]
    return body
