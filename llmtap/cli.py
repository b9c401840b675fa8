"""The llmtap command line.

llmtap up        everything, supervised, on embedded defaults (or --config)
llmtap ingress   the proxy
llmtap worker    the Faust stream worker
llmtap store     ClickHouse migrations + writer + analytics API
llmtap migrate   apply ClickHouse migrations and exit
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from llmtap.config import Settings, load_settings

log = logging.getLogger("llmtap")


def _setup_logging(settings: Settings, process: str) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


async def _wait_for_topics(settings: Settings) -> None:
    """Block until the broker answers and llmtap's topics exist."""
    from llmtap.supervisor import topics_ready

    while not await topics_ready(settings):
        log.info("waiting for the broker at %s", settings.kafka_bootstrap)
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "ingress", "worker", "store", "migrate"])
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see README)")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    _setup_logging(settings, args.command)

    if args.command == "up":
        from llmtap.supervisor import up

        return up(settings)
    if args.command == "ingress":
        from ingress.app import run as run_ingress

        run_ingress(settings)
    elif args.command == "worker":
        from stream.app import run as run_worker

        asyncio.run(_wait_for_topics(settings))
        run_worker(settings)
    elif args.command == "store":
        from sinks.app import run as run_store

        asyncio.run(_wait_for_topics(settings))
        run_store(settings)
    elif args.command == "migrate":
        from sql.migrate import migrate
        from sql.store import Store

        applied = migrate(Store(settings.store_dsn))
        print(f"applied migrations: {applied or 'none (schema up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
