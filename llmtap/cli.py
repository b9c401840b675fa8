"""The llmtap command line.

llmtap up        everything, supervised, on embedded defaults (or --config)
llmtap ingress   the proxy
llmtap worker    the Faust stream worker
llmtap store     ClickHouse migrations + writer + analytics API
llmtap migrate   apply ClickHouse migrations and exit
llmtap keys      virtual keys (create/list/revoke) and analytics admin keys (admin)
llmtap alerts    alert webhooks: send a signed sample to an endpoint (test), send
                 given-up deliveries again (redeliver)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import select
import sys
import unicodedata
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from llmtap import logs
from llmtap.config import (
    ConfigError,
    Settings,
    load_settings,
    unknown_variables,
)
from llmtap.pinned_config import pinned_config
from llmtap.stopping import Stopped, stop_once_parent_gone, stopped_at_once, unless_stopped

log = logging.getLogger("llmtap")

CONFIG_HELP = "YAML config file (see README)"


async def _wait_for_topics(settings: Settings) -> bool:
    """Block until the broker answers and llmtap's topics exist (True), or the broker
    refuses to make them (False, said); :class:`Stopped` if SIGTERM or SIGINT comes
    first (run under :func:`unless_stopped`)."""
    from llmtap.probes import broker_problem
    from llmtap.topics import TopicsRefused

    replicas = settings.topic_replication_factor
    try:
        while problem := await broker_problem(settings.kafka, settings.topic_partitions, replicas):
            log.info("waiting for the broker at %s: %s", settings.kafka_bootstrap, problem)
            await asyncio.sleep(1.0)
    except TopicsRefused as exc:
        log.error("%s", exc)
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmtap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "ingress", "worker", "store", "migrate"):
        _command(commands, name)
    keys = _command(commands, "keys", help="virtual keys (stored as SHA-256 hashes)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = _command(actions, "create", help="make a key and print it once")
    create.add_argument("--tenant", required=True, type=_tenant)
    create.add_argument("--team", default="", type=_name)
    create.add_argument("--user", default="", type=_name)
    create.add_argument(
        "--models",
        type=_models,
        default=(),
        help="comma-separated models it may use (prefix* allowed; none given: every model)",
    )
    create.add_argument(
        "--rpm", type=_rate, default=None, help="requests per minute (none: unlimited)"
    )
    create.add_argument(
        "--tpm", type=_rate, default=None, help="tokens per minute (none: unlimited)"
    )
    _command(actions, "list", help="list keys (never their secrets)")
    _command(
        actions,
        "admin",
        help="make an analytics API admin key: print it and the digest to configure",
    )
    revoke = _command(actions, "revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    alerts = _command(commands, "alerts", help="alert webhooks")
    alert_actions = alerts.add_subparsers(dest="action", required=True)
    test = _command(alert_actions, "test", help="send a signed sample alert to an endpoint")
    test.add_argument("--endpoint", required=True, help="the webhook endpoint's name")
    again = _command(
        alert_actions,
        "redeliver",
        help="send an endpoint's dead-lettered (or 410 gone, or refused) deliveries again, "
        "and enable it if a 410 disabled it; asks the running store process with an admin key "
        "(LLMTAP_ADMIN_KEY)",
    )
    again.add_argument("--endpoint", required=True, help="the webhook endpoint's name")
    again.add_argument(
        "--alert",
        dest="alert_ids",
        action="append",
        type=uuid.UUID,
        default=[],
        metavar="ALERT_ID",
        help="only this alert's delivery (repeat for more; none: every one given up)",
    )
    again.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="ISO_TIME",
        help="only deliveries given up at or after this time (no offset: UTC)",
    )
    again.add_argument("--url", help="the store's API (default: the configuration's api_url)")
    return parser


def _since(value: str) -> datetime:
    from llmtap.redeliver import since

    try:
        return since(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand that takes --config too, before or after its own arguments, as every
    one does (SUPPRESS: one without it keeps what was given before it)."""
    command = commands.add_parser(name, **kwargs)
    command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return command


def _name(value: str) -> str:
    """A key's tenant, team or user: no control characters (a newline split `keys
    list`'s line in two, and no header could claim such a name)."""
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise argparse.ArgumentTypeError(f"may not hold control characters: {value!r}")
    return value


def _tenant(value: str) -> str:
    """A key's tenant: never empty (a key of no tenant would see no tenant's data as its
    own, and an empty one could pass for every tenant's)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("a key needs a tenant: it may not be empty")
    return _name(value)


def _models(value: str) -> tuple[str, ...]:
    """The models a key may use, comma-separated, each stripped: an empty one (``","``,
    ``"a,,b"``, ``" "``, an unset variable's ``""``) is refused, not dropped: dropped,
    the key had no models named, which is a key of every model."""
    models = tuple(model.strip() for model in value.split(","))
    if not all(models):
        raise argparse.ArgumentTypeError(
            f"names an empty model in {value!r}: name each model it may use, or leave "
            "--models out for a key of every model"
        )
    for model in models:
        _name(model)
    return models


def _rate(value: str) -> int:
    """A key's rate limit: a whole number of at least 1 (the key file's rule; none given:
    unlimited)."""
    try:
        rate = int(value)
    except ValueError:
        rate = 0
    if rate < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of at least 1, not {value!r} (leave it out: unlimited)"
        )
    return rate


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from ingress.guards import keys

    path = settings.key_file
    if args.action == "admin":  # no key file: its digest goes in the config
        secret = "lta_" + secrets.token_urlsafe(32)
        digest = keys.hash_key(secret)
        print(
            f"{secret}\n(shown once; llmtap stores only its SHA-256 digest. Add it to the "
            f"config as\n  admin_key_hashes: [{digest}]\nor the environment as\n"
            f"  LLMTAP_ADMIN_KEY_HASHES='[\"{digest}\"]'\nand restart the store process, "
            "or `llmtap up`)"
        )
        return 0
    try:
        if args.action == "create":
            secret, key = keys.create_key(
                path,
                tenant=args.tenant,
                team=args.team,
                user=args.user,
                allowed_models=args.models,
                rpm=args.rpm,
                tpm=args.tpm,
            )
        elif args.action == "list":
            listed = keys.read_keys(path).keys
        else:
            revoked = keys.revoke_key(path, args.key_id)
    except keys.KEY_FILE_ERRORS as exc:  # the operator's to fix: said plainly
        done = {"create": "no key was made", "revoke": "nothing was revoked"}.get(args.action)
        print(
            f"llmtap: keys_file {path} cannot be used"
            + (f" ({done})" if done else "")
            + f": {_key_file_fault(exc)}",
            file=sys.stderr,
        )
        return 2
    if args.action == "create":
        print(
            f"{secret}\n(key id {key.id}, tenant {key.tenant!r}"
            + (f", team {key.team!r}" if key.team else "")
            + (f", user {key.user!r}" if key.user else "")
            + "; shown once, stored as a hash "
            f"in {path.resolve()}, read by an llmtap run from here or with the same config)"
        )
    elif args.action == "list":
        if not listed:  # a wrong data_dir or config reads no file: say which was read
            print(f"no keys in {path}", file=sys.stderr)
        for key in listed:
            state = "revoked" if key.revoked else "active"
            allowed = ",".join(key.allowed_models) or "*"
            print(
                f"{key.id}  {state:7}  tenant={key.tenant} team={key.team} "
                f"user={key.user} models={allowed} rpm={key.rpm or 'unlimited'} "
                f"tpm={key.tpm or 'unlimited'}"
            )
    else:
        for bad in revoked.bad:  # left as they are: the operator's to fix
            print(
                f"llmtap: keys_file {path}: {bad} is not a valid key, left as it is (fix it: "
                "until then `keys create` and `keys list` refuse the file, and a running "
                f"llmtap takes no change of it but its revocations): {bad.why}",
                file=sys.stderr,
            )
        if not revoked.found:
            print(f"no key with id {args.key_id!r} in {path}", file=sys.stderr)
            return 1
        if not revoked.changed:
            print(f"{args.key_id} was already revoked: nothing changed")
        else:
            print(f"revoked {args.key_id} (a running llmtap refuses it within about a second)")
    return 0


def _key_file_fault(exc: Exception) -> str:
    """What is wrong with a key file, in the operator's words: its entries that are no
    key, named (fix them by hand; ``keys revoke`` works all the same), or what the file
    must be."""
    from ingress.guards import keys

    if isinstance(exc, keys.BadEntries):
        return f"{exc} (fix it by hand; `llmtap keys revoke` works on the file all the same)"
    return (
        "it must be a YAML file of a top-level 'keys:' list, as `llmtap keys create` "
        f"writes it, or not exist yet; {type(exc).__name__}: {exc}"
    )


def _alerts_test(settings: Settings, name: str) -> int:
    import jinja2

    from sinks.webhooks.guard import Refused
    from sinks.webhooks.probe import probe

    endpoint = next((e for e in settings.webhooks if e.name == name), None)
    if endpoint is None:
        known = ", ".join(e.name for e in settings.webhooks) or (
            "none configured; give the configuration `llmtap up` runs with: "
            "--config FILE or LLMTAP_CONFIG"
        )
        print(f"no webhook endpoint named {name!r} (endpoints: {known})", file=sys.stderr)
        return 2
    try:
        alert, response = asyncio.run(
            probe(
                endpoint,
                allow_private=settings.webhook_allow_private,
                spike_rules=settings.spike_rules,
                budgets=settings.budgets,
            )
        )
    except Refused as exc:
        print(f"refused, nothing sent: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, jinja2.TemplateError) as exc:  # the template: none, or broken
        kind = type(exc).__name__
        print(
            f"template {endpoint.template!r} of {name}: {kind}: {exc}; nothing sent",
            file=sys.stderr,
        )
        return 1
    if response.ok:
        print(f"delivered sample alert {alert.event_id} to {name}: HTTP {response.status}")
        return 0
    print(f"sample alert {alert.event_id} to {name} failed: {response.error}", file=sys.stderr)
    return 1


def _check_webhook_templates(settings: Settings) -> None:
    """Raise :class:`ConfigError` for a webhook endpoint whose template the store could not
    load (a file missing, not UTF-8 or not Jinja2), before anything starts: the store
    process loads every template at start, and would exit with a traceback after the
    broker was started and the migrations run (`llmtap up` then gave up, status 1; a
    compose deployment restarted it again and again)."""
    import jinja2

    from sinks.webhooks import render

    for endpoint in settings.webhooks:
        try:
            render.load(endpoint.template)
        except (OSError, jinja2.TemplateError) as exc:
            where = ""
            if isinstance(exc, jinja2.TemplateSyntaxError):
                where = f" (line {exc.lineno})"
            raise ConfigError(
                f"webhooks: endpoint {endpoint.name!r}: template {endpoint.template!r} "
                f"cannot be used{where}: {exc}"
            ) from None


def _check_data_dir(settings: Settings, command: str) -> None:
    """Raise :class:`ConfigError` for a directory the command keeps its state in (the
    worker's under ``data_dir``, the ingress's spool, if it opens one; the embedded
    store's) that cannot be made or written (a file of that name, no permission), before
    anything starts: each failed with an OSError naming no setting, the worker and the
    store once the broker answered; the ingress served on, its events in memory only."""
    from llmtap.data_dir import uses_spool

    if command == "worker" or (command == "ingress" and uses_spool(settings)):
        where, setting = settings.data_dir, "data_dir"
    elif command in ("store", "migrate") and settings.embedded_store:
        where = Path(settings.store_dsn.removeprefix("chdb://"))
        setting = "clickhouse_dsn" if settings.clickhouse_dsn else "data_dir"
    else:
        return
    shown = settings.clickhouse_dsn if setting == "clickhouse_dsn" else settings.data_dir
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(f"{where} is not writable by this user")
    except OSError as exc:
        raise ConfigError(f"{setting} {shown}: cannot be used: {exc}") from None


def _check_keys_file(settings: Settings, command: str) -> None:
    """Raise :class:`ConfigError` for a ``keys_file`` that exists but cannot be loaded (a
    directory, not YAML, no top-level ``keys:`` list), before anything starts: the
    proxy and the analytics API keep their previous keys when it breaks while they run,
    but at start there are none, so they served on, ready, each call a 401. Not made
    yet is no keys (``llmtap keys create`` makes it); with ``auth: passthrough`` the
    proxy reads none."""
    if command == "ingress" and settings.auth != "keys":
        return
    from ingress.guards import keys

    try:
        keys.read_keys(settings.key_file)
    except keys.KEY_FILE_ERRORS as exc:
        raise ConfigError(
            f"keys_file {settings.key_file} cannot be used: {_key_file_fault(exc)}"
        ) from None


def _check_pricing_file(settings: Settings) -> None:
    """Raise :class:`ConfigError` for a ``pricing_file`` the ingress and the worker could
    not load (missing, not YAML, not the catalog's format), before anything starts: each
    loads it at start, and the worker exited with a traceback after the broker and the
    store had been started (`llmtap up` then gave up, status 1)."""
    if settings.pricing_file is None:
        return
    from pydantic import ValidationError
    from yaml import YAMLError

    from stream.catalog import load_catalog

    try:
        load_catalog(settings.pricing_file)
    except (OSError, UnicodeDecodeError, YAMLError, ValidationError) as exc:
        raise ConfigError(f"pricing_file {settings.pricing_file}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Run a command. Settings it cannot use (:class:`ConfigError`) are said in one line,
    exit status 2. A reader of its output that stops early (``| head -1``) ends it
    quietly, exit status 1 (Python's documentation, "Note on SIGPIPE"), not with a
    traceback (what it did, a key made, stays done). Only a closed stdout is taken so:
    a broken pipe elsewhere (a socket, a child's) is an error, and says so."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except ConfigError as exc:  # the operator's to fix: said plainly, not a traceback
        print(f"llmtap: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Nothing more can reach the reader: what is left for stdout goes nowhere, so
        # the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


def _stdout_closed() -> bool:
    """Whether the reader of stdout is gone: the write end of a pipe whose read end is
    closed polls as an error (POSIX, Linux)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings(args.config)
    logs.setup(args.command, settings.log_level)
    stop_once_parent_gone()
    for name in unknown_variables(settings, os.environ):
        log.warning("%s is not a setting: it is ignored", name)
    try:
        return _run(args, settings)
    except (ConfigError, BrokenPipeError):
        raise  # said by main()
    except Stopped as exc:  # before it started anything: a clean stop
        log.info("llmtap %s stopped (%s) before it started", args.command, exc)
        return 0
    except Exception as exc:
        # Whatever else ends the command (a port another program holds, a ClickHouse
        # server that cannot be reached): one JSON line, redacted, as every other, not
        # Python's bare traceback on stderr; exit status 1, as before.
        log.critical("llmtap %s failed: %s", args.command, exc, exc_info=True)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "keys":
        return _keys(settings, args)
    if args.command == "alerts" and args.action == "redeliver":
        from llmtap.redeliver import run as redeliver

        return redeliver(settings, args.endpoint, args.alert_ids, args.since, args.url)
    if args.command == "alerts":
        return _alerts_test(settings, args.endpoint)
    if args.command in ("up", "ingress", "worker", "store"):
        from llmtap.ports import unresolved

        if hosts := unresolved(settings, args.command):
            raise ConfigError("; ".join(hosts))
    if args.command in ("up", "store"):
        _check_webhook_templates(settings)
    if args.command in ("up", "ingress", "worker"):
        _check_pricing_file(settings)
    if args.command in ("ingress", "worker", "store", "migrate"):
        _check_data_dir(settings, args.command)
    if args.command in ("ingress", "store"):
        _check_keys_file(settings, args.command)
    if args.command == "up":
        from llmtap.data_dir import claimed
        from llmtap.supervisor import up

        with claimed(settings) as ingress_lock, pinned_config(settings) as pinned:
            _check_keys_file(settings, "up")  # once its data_dir is known to be usable
            return up(pinned, ingress_lock)
    if args.command == "ingress":
        from ingress.app import run as run_ingress
        from llmtap.data_dir import ingress_claimed

        with ingress_claimed(settings):
            run_ingress(settings)
    elif args.command == "worker":
        from stream.app import run as run_worker

        if not asyncio.run(unless_stopped(_wait_for_topics(settings))):
            return 1
        run_worker(settings)
    elif args.command == "store":
        from sinks.app import run as run_store

        # Its migrations first, here, and only here: in the app's start (a thread) a stop
        # waited for them all, a ClickHouse server that did not answer for its read timeout.
        migrated = _migrate(settings, "store")
        if migrated:
            return migrated
        if not asyncio.run(unless_stopped(_wait_for_topics(settings))):
            return 1
        run_store(settings)
    elif args.command == "migrate":
        return _migrate(settings, "migrate")
    return 0


def _migrate(settings: Settings, command: str) -> int:
    """Apply the store's migrations and retention, in the main thread, where a stop ends
    the work at once, status 1 (not done: a Job or a compose service waited for is not
    taken as migrated): a migration under way is not recorded (its version is, in one
    insert, once all its statements ran), and the next run applies it again, as it does
    one of a killed run. 2: the store is another process's, or its schema is ahead of
    this llmtap's. ``llmtap migrate`` says what it did on stdout; ``llmtap store`` logs it."""
    from sql.migrate import SchemaAhead, migrate
    from sql.retention import apply_retention
    from sql.store import Store, StoreInUse

    try:
        with stopped_at_once():
            try:
                store = Store(settings.store_dsn)
            except StoreInUse as exc:
                print(f"llmtap: {exc}", file=sys.stderr)
                return 2
            try:
                applied = migrate(store)
                if command == "migrate":
                    print(f"applied migrations: {applied or 'none (schema up to date)'}")
                elif applied:
                    log.info("migrations applied: %s", applied)
                tables = apply_retention(
                    store,
                    raw_days=settings.raw_retention_days,
                    rollup_days=settings.rollup_retention_days,
                )
            except SchemaAhead as exc:
                print(f"llmtap: {exc}", file=sys.stderr)
                return 2
            finally:
                store.close()
    except Stopped as exc:
        log.warning(
            "llmtap %s stopped (%s) before it was done: the migrations it did not finish "
            "are applied by the next llmtap migrate (or llmtap store)",
            command,
            exc,
        )
        return 1
    if command != "migrate":
        return 0
    print(
        f"retention applied to: {', '.join(tables) or 'nothing (up to date)'}"
        + (" (stored rows are rewritten to it in the background)" if tables else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
