"""Process-wide tuning shared by llmtap's high-volume processes."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Fewer, later garbage collections for a process that handles events in bulk.

    The writer holds up to two batches of decoded events, and the stream worker its
    open windows and the ids of the last 200,000 events counted (tens to hundreds of
    thousands of small objects); with CPython's default thresholds, collections over
    them cost more than the work itself (bench/ingest.py measured 18k -> 27k events/s
    decoded; bench/stream_throughput.py, see bench/results/stream.md).
    """
    gc.freeze()  # what start-up allocated is never garbage: stop scanning it
    gc.set_threshold(100_000, 50, 100)
