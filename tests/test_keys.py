"""Virtual keys and attribution at the ingress (the app itself, a real broker, the fake)."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from ingress import app as ingress_app
from ingress.forward import call
from ingress.forward.call import downstream_headers, upstream_headers
from ingress.forward.endpoint import upstream_credential
from ingress.forward.openai import OPENAI
from ingress.guards import key_store
from ingress.guards import keys as key_files
from ingress.guards.auth import Identity, Refusal, authenticate
from ingress.guards.key_store import KeyStore
from ingress.guards.keys import (
    VirtualKey,
    create_key,
    hash_key,
    read_keys,
    revoke_key,
)
from llmtap.config import Settings
from llmtap.config_sections import ProviderConfig
from llmtap.events import Attribution
from tests.conftest import INGRESS_PROVIDER_KEY as PROVIDER_KEY
from tests.conftest import Broker, FakeUpstream, serve_ingress
from tests.raw_http import raw_request
from tests.test_ingress_ops import response_event


async def chat(
    base: str, key: str, model: str = "gpt-4o", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as response,
    ):
        return response.status, await response.json()


async def test_an_unknown_key_gets_401_without_contacting_the_provider(
    ingress: str, upstream: FakeUpstream
) -> None:
    before = len(upstream.provider.received)
    status, body = await chat(ingress, "ltk_not-a-real-key")
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "llmtap keys create" in body["error"]["message"]

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{ingress}/v1/messages",
            json={"model": "claude-3-5-haiku", "max_tokens": 5, "messages": []},
            headers={"x-api-key": "ltk_not-a-real-key"},
        ) as response,
    ):
        assert response.status == 401
        anthropic = await response.json()
    assert anthropic["type"] == "error"
    assert anthropic["error"]["type"] == "authentication_error"
    assert len(upstream.provider.received) == before


async def test_a_key_works_until_revoked_and_only_its_hash_is_stored(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    secret, key = create_key(ingress_settings.key_file, tenant="acme")
    assert secret not in ingress_settings.key_file.read_text()
    assert read_keys(ingress_settings.key_file).keys[0].id == key.id

    await known(ingress, secret)  # within about a second: the file is re-read in a thread
    assert (await chat(ingress, secret))[0] == 200
    seen = upstream.provider.received[-1]
    assert seen.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"  # never the virtual key

    assert revoke_key(ingress_settings.key_file, key.id).changed
    async with asyncio.timeout(10):
        while (await chat(ingress, secret))[0] != 401:
            await asyncio.sleep(0.1)


async def test_a_key_made_a_moment_ago_works_at_once(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script that makes a key and calls with it straight away is not answered 401
    until the next periodic reload (an hour away here): a key the ingress does not know
    sends it to the file first, when the file changed. On every route: the unmetered
    ones (``GET /v1/models``, what an SDK or a tool asks first to check its key) did not
    look, and answered such a key 401 while a call took it."""
    monkeypatch.setattr(ingress_app, "KEY_RELOAD_S", 3600.0)
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", PROVIDER_KEY)
    create_key(ingress_settings.key_file, tenant="acme")  # read as the ingress starts
    server = await serve_ingress(ingress_settings)
    try:
        base = str(server.make_url("")).rstrip("/")
        secret, _ = create_key(ingress_settings.key_file, tenant="globex")
        assert (await chat(base, secret))[0] == 200
        assert upstream.provider.received[-1].headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
        assert (await chat(base, "ltk_not-a-real-key"))[0] == 401
        listing, _ = create_key(ingress_settings.key_file, tenant="initech")
        async with aiohttp.ClientSession() as session:
            for key, status in ((listing, 200), ("ltk_not-a-real-key", 401)):
                headers = {"Authorization": f"Bearer {key}"}
                async with session.get(f"{base}/v1/models", headers=headers) as response:
                    assert response.status == status
    finally:
        await server.close()


async def test_a_key_missed_while_the_file_is_being_read_is_looked_up_after(
    tmp_path: Path,
) -> None:
    """A call whose key the periodic reload is installing as it asks (the file's stamp
    taken, its keys not installed yet) waits for that reload, and finds its key: the
    stamp alone said nothing changed, and it was answered 401."""
    path = tmp_path / "keys.yaml"
    create_key(path, tenant="acme")
    store = KeyStore(path)
    store.reload()
    secret, _ = create_key(path, tenant="globex")
    found = os.stat(path)
    with store._reloading:  # the periodic reload, in its thread, partway
        store._stamp = (found.st_ino, found.st_mtime_ns, found.st_ctime_ns, found.st_size)
        asked = asyncio.ensure_future(store.refreshed())
        await asyncio.sleep(0)  # asked while it reads
        store._by_hash = key_store.by_hash(read_keys(path))
    assert await asked
    assert store.lookup(secret) is not None


async def known(ingress: str, secret: str) -> None:
    """Wait until the ingress has loaded a freshly created key."""
    async with asyncio.timeout(10):
        while (await chat(ingress, secret))[0] == 401:
            await asyncio.sleep(0.1)


async def test_a_key_limited_to_some_models_gets_403_for_others(
    ingress: str, ingress_settings: Settings
) -> None:
    secret, _ = create_key(
        ingress_settings.key_file, tenant="acme", allowed_models=("gpt-4o-mini*",)
    )
    await known(ingress, secret)
    assert (await chat(ingress, secret, model="gpt-4o-mini-2024-07-18"))[0] == 200
    status, body = await chat(ingress, secret, model="gpt-4o")
    assert status == 403
    assert body["error"]["param"] == "model"
    assert "may not use model 'gpt-4o'" in body["error"]["message"]


async def test_a_key_limited_to_some_models_cannot_name_another_for_a_tool(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """Anthropic's advisor tool names a model of its own, which the provider runs and
    bills: a key limited to Haiku named Opus there and was forwarded (only the call's
    own model was checked)."""
    secret, _ = create_key(
        ingress_settings.key_file, tenant="acme", allowed_models=("claude-3-5-haiku*",)
    )
    await known(ingress, secret)
    before = len(upstream.provider.received)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{ingress}/v1/messages",
            json={
                "model": "claude-3-5-haiku",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [
                    {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4"}
                ],
            },
            headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
        ) as response,
    ):
        status, body = response.status, await response.json()
    assert status == 403, body
    assert body["error"]["type"] == "permission_error"
    assert "may not use model (named by a tool) 'claude-opus-4'" in body["error"]["message"]
    assert len(upstream.provider.received) == before


async def test_headers_cannot_contradict_the_key_but_may_add_to_it(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    team_key, _ = create_key(ingress_settings.key_file, tenant="acme", team="search")
    tenant_key, _ = create_key(ingress_settings.key_file, tenant="acme")
    await known(ingress, tenant_key)

    status, body = await chat(ingress, team_key, headers={"x-llmtap-team": "billing"})
    assert status == 403
    assert "bound to team 'search'" in body["error"]["message"]
    # A code to branch on, as every other refusal has, and the header to blame.
    assert (body["error"]["code"], body["error"]["param"]) == (
        "attribution_conflict",
        "x-llmtap-team",
    )
    status, body = await chat(ingress, team_key, headers={"x-llmtap-tenant": "globex"})
    assert status == 403

    status, _ = await chat(
        ingress, tenant_key, headers={"x-llmtap-team": "billing", "x-llmtap-feature": "faq"}
    )
    assert status == 200
    assert not any(
        h.lower().startswith("x-llmtap-") for h in upstream.provider.received[-1].headers
    )


async def test_without_a_provider_key_a_virtual_key_is_never_forwarded(
    ingress: str,
    ingress_settings: Settings,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    await known(ingress, secret)
    monkeypatch.delenv("LLMTAP_TEST_OPENAI_KEY")
    before = len(upstream.provider.received)
    status, body = await chat(ingress, secret)
    assert status == 500
    assert "LLMTAP_TEST_OPENAI_KEY" in body["error"]["message"]
    assert len(upstream.provider.received) == before


async def test_passthrough_forwards_the_clients_own_key(
    ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    passthrough = ingress_settings.model_copy(update={"auth": "passthrough"})
    server = await serve_ingress(passthrough)
    try:
        status, _ = await chat(str(server.make_url("")).rstrip("/"), "sk-the-clients-own")
    finally:
        await server.close()
    assert status == 200
    assert upstream.provider.received[-1].headers["Authorization"] == "Bearer sk-the-clients-own"


async def test_passthrough_forwards_the_clients_own_key_when_llmtap_holds_one_too(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the provider's key set where llmtap runs, as it usually is: each caller's
    own key still goes (not llmtap's, which would bill every team's calls, and calls
    with any key or none, to llmtap's account), and a caller with none sends none on
    (the provider answers it: a real one with its 401)."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", PROVIDER_KEY)
    passthrough = ingress_settings.model_copy(update={"auth": "passthrough"})
    server = await serve_ingress(passthrough)
    root = str(server.make_url("")).rstrip("/")
    try:
        status, _ = await chat(root, "sk-the-clients-own")
        assert status == 200
        assert upstream.provider.received[-1].headers["Authorization"] == (
            "Bearer sk-the-clients-own"
        )
        before = len(upstream.provider.received)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{root}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            ):
                pass
        assert len(upstream.provider.received) == before + 1
        assert "Authorization" not in upstream.provider.received[-1].headers
    finally:
        await server.close()


def test_an_identity_follows_the_headers_and_the_key_file_of_each_call(tmp_path: Path) -> None:
    """authenticate() keeps the identity it made for a key and its x-llmtap-* headers:
    another header, a key edited in its file, a revoked key each get theirs."""
    settings = Settings(data_dir=tmp_path)
    secret, _ = create_key(settings.key_file, tenant="acme", team="search")
    store = KeyStore(settings.key_file)
    store.reload()

    def who(**claims: str) -> Attribution:
        headers = {"Authorization": f"Bearer {secret}"}
        headers.update(
            {"X-LLMTAP-" + name.upper().replace("_", "-"): value for name, value in claims.items()}
        )
        return authenticate(CIMultiDictProxy(CIMultiDict(headers)), settings, store).attribution

    assert (who().team, who().feature) == ("search", "")
    assert who(feature="chat").feature == "chat"
    assert who(feature="mail").feature == "mail"
    assert who(property_run="7").properties == {"run": "7"}
    assert who(feature="chat").feature == "chat"
    with pytest.raises(Refusal) as refused:
        who(team="billing")
    assert refused.value.status == 403

    # The same key (same hash), given another team in its file: the new team.
    settings.key_file.write_text(
        settings.key_file.read_text().replace("team: search", "team: growth")
    )
    store.reload()
    assert who(feature="chat").team == "growth"
    assert who(team="growth").team == "growth"

    assert revoke_key(settings.key_file, read_keys(settings.key_file).keys[0].id).changed
    store.reload()
    with pytest.raises(Refusal) as revoked:
        who(feature="chat")
    assert revoked.value.status == 401


def test_the_keys_commands_say_what_they_did(tmp_path: Path) -> None:
    env = {**os.environ, "LLMTAP_DATA_DIR": str(tmp_path)}

    def llmtap(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "llmtap", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    made = llmtap("keys", "create", "--tenant", "acme", "--team", "search")
    assert made.returncode == 0 and "tenant 'acme', team 'search';" in made.stdout
    key_id = read_keys(tmp_path / "keys.yaml").keys[0].id
    assert key_id in made.stdout
    revoked = llmtap("keys", "revoke", key_id)
    assert revoked.returncode == 0 and revoked.stdout.startswith(f"revoked {key_id}")
    assert read_keys(tmp_path / "keys.yaml").keys[0].revoked
    again = llmtap("keys", "revoke", key_id)  # it said "revoked", as if it had just been
    assert again.returncode == 0 and again.stdout.startswith(f"{key_id} was already revoked")
    assert llmtap("keys", "revoke", "key_nope").returncode == 1


def test_keys_list_shows_each_key_s_rate_limits(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """`keys list` left out a key's --rpm and --tpm: which keys are limited, and how
    far, could be read only in the key file. With no keys (another directory's data_dir,
    another config) it printed nothing: now it names the file it read."""
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path))
    assert cli(["keys", "list"]) == 0
    assert capsys.readouterr() == ("", f"no keys in {tmp_path / 'keys.yaml'}\n")
    assert cli(["keys", "create", "--tenant", "acme", "--rpm", "60", "--tpm", "90000"]) == 0
    assert cli(["keys", "create", "--tenant", "globex", "--tpm", "5000"]) == 0
    capsys.readouterr()
    assert cli(["keys", "list"]) == 0
    limited, unlimited_rpm = capsys.readouterr().out.splitlines()
    assert "tenant=acme " in limited and limited.endswith(" rpm=60 tpm=90000")
    assert "tenant=globex " in unlimited_rpm and unlimited_rpm.endswith(" rpm=unlimited tpm=5000")


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--rpm", "-1"], "argument --rpm: must be a whole number of at least 1, not '-1'"),
        (["--rpm", "0", "--tpm", "0"], "argument --rpm: must be a whole number of at least 1"),
        (["--tpm", "0"], "argument --tpm: must be a whole number of at least 1, not '0'"),
        (["--tpm", "1.5"], "argument --tpm: must be a whole number of at least 1, not '1.5'"),
        # A newline split `keys list`'s line in two; no header could claim such a name.
        (["--team", "a\nb"], "argument --team: may not hold control characters: 'a\\nb'"),
        (["--user", "u\t1"], "argument --user: may not hold control characters: 'u\\t1'"),
        # An empty model name: the key was made for every model, the restriction lost.
        (["--models", ","], "argument --models: names an empty model in ','"),
        (["--models", "gpt-4o,,o3"], "argument --models: names an empty model in 'gpt-4o,,o3'"),
        (["--models", " "], "argument --models: names an empty model in ' '"),
        (["--models", ""], "argument --models: names an empty model in ''"),
        (["--models", "gpt-4o,"], "argument --models: names an empty model in 'gpt-4o,'"),
        (["--models", "gpt\n4o"], "argument --models: may not hold control characters"),
    ],
)
def test_a_key_a_flag_cannot_make_is_refused_naming_the_flag(
    flags: list[str],
    refused: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """--rpm -1 (or 0: a key's limits are at least 1) printed pydantic's ValidationError
    as a traceback; now argparse's usage error, exit status 2, and no key made."""
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        cli(["keys", "create", "--tenant", "acme", *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"llmtap keys create: error: {refused}" in err and "Traceback" not in err, err
    assert not (tmp_path / "keys.yaml").exists()
    made = ["--rpm", "1", "--tpm", "5000", "--models", " gpt-4o* , o3"]
    assert cli(["keys", "create", "--tenant", "acme", *made]) == 0
    [key] = read_keys(tmp_path / "keys.yaml").keys
    assert (key.rpm, key.tpm, key.allowed_models) == (1, 5000, ("gpt-4o*", "o3"))


@pytest.mark.parametrize("broken", ["bad yaml", "a directory", "not keys", "under a file"])
@pytest.mark.parametrize("action", [["list"], ["create", "--tenant", "acme"], ["revoke", "k"]])
def test_a_key_file_that_cannot_be_used_is_said_plainly(
    broken: str,
    action: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """A keys_file of bad YAML, or naming a directory, gave `keys list` and `keys create`
    a traceback; now one message naming keys_file, exit status 2, the file untouched.
    One under a file (a data_dir that is a file) was listed as no keys, exit status 0,
    and `revoke` found no key there (exit 1), while `create` said it cannot be used."""
    path = tmp_path / "team-keys.yaml"
    if broken == "a directory":
        path.mkdir()
    elif broken == "under a file":
        path.write_text("keys: []\n")
        path = path / "keys.yaml"
    else:
        path.write_text("keys: [1\n" if broken == "bad yaml" else "keys: {id: k}\n")
    before = None if path.is_dir() or broken == "under a file" else path.read_text()
    monkeypatch.setenv("LLMTAP_KEYS_FILE", str(path))
    assert cli(["keys", *action]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmtap: keys_file {path} cannot be used"), err
    assert "a top-level 'keys:' list" in err and "Traceback" not in err
    if action[0] == "create":
        assert "(no key was made)" in err
    if broken != "under a file":
        assert (None if path.is_dir() else path.read_text()) == before


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`llmtap keys create ... | head -1`: a reader gone before the output was written
    gave a BrokenPipeError traceback after the key was made; now a quiet exit, status 1
    (Python's "Note on SIGPIPE"), and the key is made all the same."""
    env = {**os.environ, "LLMTAP_DATA_DIR": str(tmp_path)}
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is written
    try:
        argv = [sys.executable, "-m", "llmtap", "keys", "create", "--tenant", "acme"]
        done = subprocess.run(
            argv, env=env, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (1, "")
    assert len(read_keys(tmp_path / "keys.yaml").keys) == 1


def _create(path: Path, start: Any, team: str, count: int) -> None:
    start.wait()
    for _ in range(count):
        create_key(path, tenant="acme", team=team)


def _revoke(path: Path, start: Any, ids: list[str]) -> None:
    start.wait()
    for key_id in ids:
        assert revoke_key(path, key_id).changed


def test_concurrent_writers_of_the_key_file_lose_nothing(tmp_path: Path) -> None:
    """Processes creating keys while another revokes some: every key made is in the
    file, every revocation kept (each rewrites the file under its lock)."""
    path = tmp_path / "keys.yaml"
    victims = [create_key(path, tenant="acme", team="victims")[1].id for _ in range(10)]
    context = multiprocessing.get_context("fork")
    start = context.Barrier(4)
    workers = [
        *(context.Process(target=_create, args=(path, start, f"w{i}", 10)) for i in range(3)),
        context.Process(target=_revoke, args=(path, start, victims)),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    keys = read_keys(path).keys
    assert sorted(k.team for k in keys if not k.revoked) == sorted(["w0", "w1", "w2"] * 10)
    assert sorted(k.id for k in keys if k.revoked) == sorted(victims)


def test_a_broken_key_file_is_read_once_until_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad hand edit is logged once, not at every call with an unknown key (anyone can
    send one); the previous keys stay in use until the file is fixed."""
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, tenant="acme")
    good = path.read_text()
    store = KeyStore(path)
    store.reload()
    assert store.lookup(secret) is not None
    caplog.set_level(logging.ERROR, logger="ingress.guards.key_store")

    def broken() -> int:
        for _ in range(5):
            store.reload()
            assert store.lookup("ltk_" + secrets.token_urlsafe(32)) is None
        assert store.lookup(secret) is not None
        return len([r for r in caplog.records if "unreadable" in r.getMessage()])

    path.write_text(good + "  colour: red\n")  # not a field of a key
    assert broken() == 1
    path.write_text(good + "  colour: blue\n")  # another change, another error
    assert broken() == 2
    path.write_text(good.replace("tenant: acme", "tenant: globex"))
    assert store.reload()
    key = store.lookup(secret)
    assert key is not None and key.tenant == "globex"


def test_a_key_file_naming_a_field_twice_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key revoked by hand with `revoked: true` added above its `revoked: false`:
    PyYAML kept the last value without a word, so the key stayed live, the proxy and the
    commands saying nothing (`keys revoke` then said it revoked it, rewriting the file).
    A field named twice is now a bad hand edit: logged, the previous keys kept, and the
    commands refuse the file."""
    path = tmp_path / "keys.yaml"
    secret, key = create_key(path, tenant="acme")
    store = KeyStore(path)
    store.reload()
    caplog.set_level(logging.ERROR, logger="ingress.guards.key_store")
    edited = path.read_text().replace(f"- id: {key.id}\n", f"- id: {key.id}\n  revoked: true\n")
    assert edited.count("revoked:") == 2
    path.write_text(edited)
    assert not store.reload()
    assert store.lookup(secret) is not None  # the previous keys, until it is fixed
    [said] = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert "found duplicate key 'revoked'" in said
    with pytest.raises(key_files.KEY_FILE_ERRORS):
        read_keys(path)


def test_a_hash_pasted_in_upper_case_is_the_key_s(tmp_path: Path) -> None:
    """A key's SHA-256 pasted in upper case (as some tools print it) never matched: the
    key was refused (401), and nothing said why. A hash is read in lower case."""
    path = tmp_path / "keys.yaml"
    secret = "ltk_upper"
    assert hash_key(secret) != hash_key(secret).upper()
    path.write_text(f"keys:\n- id: key_a\n  tenant: acme\n  hash: {hash_key(secret).upper()}\n")
    store = KeyStore(path)
    assert store.reload()
    key = store.lookup(secret)
    assert key is not None and key.id == "key_a" and key.hash == hash_key(secret)


@pytest.mark.parametrize("limit", ["rpm: yes", "tpm: true", "rpm: on", "tpm: True"])
def test_a_yes_or_no_is_no_rate_limit(limit: str, tmp_path: Path) -> None:
    """YAML 1.1 reads `rpm: yes` (or on, true) as a yes/no, which was taken for 1: a
    key limited to one call a minute, said nowhere. The entry is refused, naming it."""
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n- id: key_a\n  tenant: acme\n  {limit}\n  hash: '{'a' * 64}'\n")
    with pytest.raises(ValueError) as refused:
        read_keys(path)
    said = str(refused.value)
    field = limit.split(":")[0]
    named = f"entry 1 (id 'key_a') is not a valid key: {field}: a limit is a whole number"
    assert said.startswith(named), said


def test_a_bad_entry_does_not_stop_keys_revoke_of_another(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """One bad entry (a hand edit) made the commands refuse the whole file: `keys revoke`
    of any other key, a leaked one, revoked nothing until it was fixed, and the proxy
    kept its previous keys, the leaked one live. The command now revokes the key, names
    the bad entry, and keeps it as it was (to be fixed by hand); the proxy keeps its
    previous keys but those the file lists revoked."""
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path))
    path = tmp_path / "keys.yaml"
    leaked_secret, leaked = create_key(path, tenant="acme")
    edited_secret, edited = create_key(path, tenant="globex", rpm=5)
    store = KeyStore(path)
    assert store.reload()
    path.write_text(path.read_text().replace("rpm: 5", "rpm: 5/min"))  # a bad hand edit
    assert not store.reload()  # refused: the previous keys kept
    assert store.lookup(leaked_secret) == leaked and store.lookup(edited_secret) == edited
    assert cli(["keys", "list"]) == 2  # named as the operator counts, not keys.1.rpm
    err = capsys.readouterr().err
    assert f"entry 2 (id '{edited.id}') is not a valid key: rpm: Input should be" in err, err
    bad_entry = {**edited.model_dump(mode="json"), "rpm": "5/min"}
    assert cli(["keys", "revoke", leaked.id]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"revoked {leaked.id}"), out
    assert f"entry 2 (id '{edited.id}') is not a valid key, left as it is" in err, err
    assert "rpm: Input should be a valid integer" in err, err
    listed = yaml.safe_load(path.read_text())["keys"]
    assert listed[0] == {**leaked.model_dump(mode="json"), "revoked": True}
    assert listed[1] == bad_entry
    assert store.reload() and store.lookup(leaked_secret) is None
    assert store.lookup(edited_secret) == edited  # as it was before the bad edit
    # The bad entry's own key may be revoked too: marked revoked, left bad.
    assert cli(["keys", "revoke", edited.id]) == 0
    assert capsys.readouterr().out.startswith(f"revoked {edited.id}")
    assert yaml.safe_load(path.read_text())["keys"][1] == {**bad_entry, "revoked": True}
    assert store.reload() and store.lookup(edited_secret) is None
    assert cli(["keys", "revoke", edited.id]) == 0
    assert f"{edited.id} was already revoked" in capsys.readouterr().out


def test_keys_revoke_of_an_entry_whose_hash_an_edit_broke_reaches_the_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[[list[str]], int]
) -> None:
    """`keys revoke` of a key whose entry an edit broke (``hash:`` typed ``hsh:``) marks
    the entry revoked and says a running llmtap refuses it; the proxy, which revoked by
    hash only, kept the key live until the file was fixed. It revokes by id too."""
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path))
    path = tmp_path / "keys.yaml"
    secret, key = create_key(path, tenant="acme")
    store = KeyStore(path)
    assert store.reload()
    path.write_text(path.read_text().replace("hash:", "hsh:"))
    assert not store.reload() and store.lookup(secret) == key  # the previous keys kept
    assert cli(["keys", "revoke", key.id]) == 0
    assert store.reload() and store.lookup(secret) is None


def test_a_key_file_rewritten_keeps_its_owner_and_mode_and_is_made_private(
    tmp_path: Path,
) -> None:
    """A key file the proxy's user owns, rewritten by a command run as another user
    (``sudo llmtap keys revoke``): it was made the writer's, 0600, which the proxy could
    not read; keeping the keys it had, it went on taking the key revoked. A new file is
    0600; what others could read of the old is not kept."""
    path = tmp_path / "keys.yaml"
    _, first = create_key(path, tenant="acme")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    owner = (path.stat().st_uid, path.stat().st_gid)
    if os.geteuid() == 0:  # as root, as sudo runs it: the file is given back
        os.chown(path, 65534, 65534)
        owner = (65534, 65534)
    revoke_key(path, first.id)
    after = path.stat()
    assert (after.st_uid, after.st_gid) == owner
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert read_keys(path).keys[0].revoked


def test_a_key_file_rewritten_by_a_member_of_its_group_keeps_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written by a user who may not give the file away (not root) but belongs to its
    group (an operator of group llmtap, the file 0660): giving it back whole failed, and
    the group went with the owner; the proxy's user could no longer read it."""
    path = tmp_path / "keys.yaml"
    _, first = create_key(path, tenant="acme")
    me = os.getuid()
    group = 65534 if me == 0 else os.getgid()  # another group, where one may be given
    os.chown(path, me, group)
    os.chmod(path, 0o660)
    real_fchown = os.fchown

    def as_a_member(fd: int, uid: int, gid: int) -> None:
        if uid != -1:  # a user who is not root may not give the file to another
            raise PermissionError(1, "Operation not permitted")
        real_fchown(fd, uid, gid)

    monkeypatch.setattr(os, "fchown", as_a_member)
    revoke_key(path, first.id)
    after = path.stat()
    assert (after.st_gid, stat.S_IMODE(after.st_mode)) == (group, 0o660)


def _revoke_as_a_member(path: Path, key_id: str, group: int) -> None:
    """Revoke as a user who is not the file's owner, but of its group (nobody)."""
    os.setgroups([group])
    os.setgid(group)
    os.setuid(65534)
    assert revoke_key(path, key_id).changed


@pytest.mark.skipif(os.geteuid() != 0, reason="takes root to act as another user")
def test_a_member_of_the_key_file_s_group_may_take_its_lock(tmp_path: Path) -> None:
    """The lock file was made 0600, its maker's (the proxy's user, root): an operator of
    the key file's group (the file 0660, in a directory the group may write) could not
    open it, and `keys revoke` said the keys_file cannot be used, revoking nothing."""
    group = 65534
    directory = Path(tempfile.mkdtemp(dir="/tmp"))  # not under tmp_path: 0700 above it
    try:
        os.chown(directory, 0, group)
        os.chmod(directory, 0o770)
        path = directory / "keys.yaml"
        _, first = create_key(path, tenant="acme")  # as root: the lock made by it
        os.chown(path, 0, group)
        os.chmod(path, 0o660)
        member = multiprocessing.get_context("fork").Process(
            target=_revoke_as_a_member, args=(path, first.id, group)
        )
        member.start()
        member.join(60)
        assert member.exitcode == 0
        assert read_keys(path).keys[0].revoked
    finally:
        shutil.rmtree(directory)


def test_a_key_file_the_proxy_may_not_open_is_said_once_until_that_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reloaded every second, a file the proxy's user may not open was logged every
    second for as long as it lasted; now once, again once it is read or fails else."""
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, tenant="acme")
    store = KeyStore(path)
    assert store.reload()
    real_open = Path.open
    refusal = "Permission denied"

    def as_another_user(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:
            raise PermissionError(13, refusal, str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", as_another_user)
    with caplog.at_level(logging.ERROR, logger="ingress.guards.key_store"):
        for _ in range(5):
            assert not store.reload()
        refusal = "Operation not permitted"
        store.reload()
    said = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(said) == 2 and "Permission denied" in said[0] and "not permitted" in said[1]
    assert store.lookup(secret) is not None  # the keys it had are kept (README)


def test_a_key_file_written_is_durable_with_its_directory_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation said done must survive a power loss: the rename is synced too (its
    directory), not only the new file."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    create_key(tmp_path / "keys.yaml", tenant="acme")
    assert synced == [False, True]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keys-")] == []


def test_a_key_file_emptied_to_be_rewritten_keeps_the_keys(tmp_path: Path) -> None:
    """Rewritten in place (a shell's >, an editor, a config tool), the file is empty for
    a moment: read then, it dropped every key (401 for every client) until the next
    reload. Only a file that says so has no keys."""
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, tenant="acme")
    good = path.read_text()
    store = KeyStore(path)
    store.reload()
    for moment in ("", "\n", "# being written\n", "version: 2\n"):
        path.write_text(moment)
        assert not store.reload(), moment
        assert store.lookup(secret) is not None
    path.write_text(good)
    path.write_text("keys: []\n")
    assert store.reload() and store.lookup(secret) is None


def test_a_key_file_that_is_a_link_is_written_through_it(tmp_path: Path) -> None:
    """A keys_file that is a symbolic link (config management, a mount that links the
    file in): `keys create` and `keys revoke` replaced the link with a file of their own,
    so the file it pointed to (what the tool manages, or another link to it reads) kept
    the revoked key live. They write to the link's target, atomically as ever, and lock
    beside it; the link stays a link."""
    real = tmp_path / "managed" / "keys.yaml"
    real.parent.mkdir()
    _, first = create_key(real, tenant="acme")
    link = tmp_path / "keys.yaml"
    link.symlink_to(Path("managed") / "keys.yaml")  # relative, as a mount's are
    also = tmp_path / "also.yaml"
    also.symlink_to(link)  # a link to the link
    store = KeyStore(real)
    assert store.reload()
    secret, second = create_key(link, tenant="acme")
    revoke_key(also, first.id)
    assert link.is_symlink() and also.is_symlink()
    assert [(k.id, k.revoked) for k in read_keys(real).keys] == [
        (first.id, True),
        (second.id, False),
    ]
    assert store.reload() and store.lookup(secret) is not None
    assert sorted(p.name for p in real.parent.iterdir()) == ["keys.yaml", "keys.yaml.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["also.yaml", "keys.yaml", "managed"]
    # A link to nothing yet: the file is made where it points.
    dangling = tmp_path / "later.yaml"
    dangling.symlink_to(Path("managed") / "later.yaml")
    create_key(dangling, tenant="acme")
    assert dangling.is_symlink() and len(read_keys(real.parent / "later.yaml").keys) == 1


def test_a_key_listed_twice_is_revoked_by_either_entry(tmp_path: Path) -> None:
    """A key file merged by hand (two branches of a config repo) may list a key twice,
    one copy revoked: the last entry won, so the revoked key was live whenever a live
    copy came after it. Any revoked entry now revokes the key, and `keys revoke`
    revokes every entry of its id."""
    path = tmp_path / "keys.yaml"
    secret, key = create_key(path, tenant="acme", team="search")
    entry = path.read_text().removeprefix("keys:\n")
    revoke_key(path, key.id)
    path.write_text(path.read_text() + entry)  # a live copy after the revoked one
    assert [k.revoked for k in read_keys(path).keys] == [True, False]
    store = KeyStore(path)
    assert store.reload() and store.lookup(secret) is None

    path.write_text("keys:\n" + entry + entry)  # both live: the key works
    assert store.reload() and store.lookup(secret) == key
    assert revoke_key(path, key.id).changed
    assert [k.revoked for k in read_keys(path).keys] == [True, True]
    assert store.reload() and store.lookup(secret) is None
    again = revoke_key(path, key.id)
    assert again.found and not again.changed  # "already revoked"


def test_a_key_file_gone_for_a_moment_keeps_the_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted for a moment (a tool that deletes before it writes), the file dropped every
    key: 401 for every client until it was back. The keys are kept GONE_GRACE_S for it
    to return (logged once); gone for longer, every key is dropped, since the commands
    cannot revoke a key of a file that is not there."""
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, tenant="acme")
    good = path.read_text()
    store = KeyStore(path)
    store.reload()
    caplog.set_level(logging.WARNING, logger="ingress.guards.key_store")
    path.unlink()
    for _ in range(3):
        assert not store.reload()
        assert store.lookup(secret) is not None
    assert len([r for r in caplog.records if "is gone" in r.getMessage()]) == 1
    path.write_text(good.replace("tenant: acme", "tenant: globex"))
    assert store.reload()
    key = store.lookup(secret)
    assert key is not None and key.tenant == "globex"
    path.unlink()
    assert not store.reload() and store.lookup(secret) is not None
    monkeypatch.setattr(key_store, "GONE_GRACE_S", 0.0)  # the grace over
    assert store.reload() and store.lookup(secret) is None


def _revoke_in_place(path: Path) -> None:
    """Revoke the file's one key, in place (same inode) and to the same size."""
    text = path.read_text()
    assert "revoked: false" in text
    with path.open("r+") as file:
        file.write(text.replace("revoked: false", "revoked: true "))


def test_a_key_file_edited_twice_within_one_timestamp_tick_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoked in place, to the same size, within the filesystem's timestamp tick: the
    file reports the inode, times and size of the version already loaded (made so here:
    a tick is milliseconds to seconds). The key must still stop working; it went on
    until the file changed again."""
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, tenant="acme")
    store = KeyStore(path)
    assert store.reload()
    loaded = os.stat(path)
    _revoke_in_place(path)
    monkeypatch.setattr("ingress.guards.key_store.os.fstat", lambda fd: loaded)
    assert store.reload()
    assert store.lookup(secret) is None
    assert not store.reload()  # unchanged since: not loaded again


def test_a_key_file_edited_with_its_mtime_kept_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoked in place, to the same size, by a tool that keeps the file's mtime (`cp
    -p`, `rsync -t`), after the file was loaded long enough ago not to be read again for
    its recent time: its ctime, which no tool sets back, shows the change."""
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, tenant="acme")
    store = KeyStore(path)
    later = time.time_ns() + 60_000_000_000
    monkeypatch.setattr("ingress.guards.key_store.time.time_ns", lambda: later)  # a minute on
    assert store.reload()
    loaded = os.stat(path)
    _revoke_in_place(path)
    os.utime(path, ns=(loaded.st_atime_ns, loaded.st_mtime_ns))
    assert store.reload()
    assert store.lookup(secret) is None


async def test_the_ingress_loop_never_waits_for_a_large_key_file(
    ingress: str, ingress_settings: Settings
) -> None:
    """A key file of tens of thousands of keys is re-read in a thread: calls, a new key's
    first among them, do not stall the ingress's event loop while it loads (parsed on
    the loop, 20,000 keys stall it ~0.45 s here, ~1.2 s with collections; in the thread,
    the longest gap is ~0.04 s)."""
    secret = "ltk_" + secrets.token_urlsafe(32)
    lines = [f"- {{id: key_{i}, hash: '{i:064x}', tenant: acme}}" for i in range(20_000)]
    lines.append(f"- {{id: key_new, hash: '{hash_key(secret)}', tenant: acme}}")
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    # What earlier tests left on this process's heap is set aside, as the ingress sets
    # aside its own at start (gc.freeze): a collection over it is no part of a reload.
    gc.collect()
    gc.freeze()
    ticker = asyncio.create_task(tick())
    try:
        staged = ingress_settings.key_file.with_suffix(".new")
        staged.write_text("keys:\n" + "\n".join(lines) + "\n")
        staged.replace(ingress_settings.key_file)
        async with asyncio.timeout(30):
            while (await chat(ingress, secret))[0] == 401:
                assert (await chat(ingress, "ltk_unknown"))[0] == 401
    finally:
        ticker.cancel()
        gc.unfreeze()
    assert max(gaps) < 0.25  # parsed on the loop, as it was: 0.45 s and more


def test_the_provider_key_replaces_every_credential_the_client_sent() -> None:
    """With llmtap's key injected, nothing the client says of who it is to the provider
    goes on: its key in any header a provider reads one from (Azure's api-key too), nor
    the OpenAI organization or project that would pick what llmtap's key bills. In
    pass-through (no credential injected) they are the caller's own, and go on."""
    sent = CIMultiDictProxy(
        CIMultiDict(
            {
                "Authorization": "Bearer ltk_client",
                "x-api-key": "ltk_client",
                "api-key": "ltk_client",
                "OpenAI-Organization": "org-other",
                "OpenAI-Project": "proj-other",
                "x-llmtap-team": "search",
                "x_llmtap_team": "search",  # not read as a claim: not passed on either
                "x-llmtap_user": "ann",  # nor with its separators mixed
                "traceparent": "00-abc-def-01",
                "User-Agent": "OpenAI/Python",
            }
        )
    )
    out = upstream_headers(sent, credential=("Authorization", f"Bearer {PROVIDER_KEY}"))
    assert dict(out) == {
        "traceparent": "00-abc-def-01",
        "User-Agent": "OpenAI/Python",
        "Authorization": f"Bearer {PROVIDER_KEY}",
    }
    kept = upstream_headers(sent, credential=None)  # pass-through: the caller's own
    assert {"Authorization", "api-key", "OpenAI-Organization", "OpenAI-Project"} <= set(kept)
    assert not any("llmtap" in name.lower() for name in kept)


def test_headers_the_connection_header_names_are_not_passed_on() -> None:
    """They are that hop's own (RFC 9110 §7.6.1), either way."""
    sent = CIMultiDictProxy(
        CIMultiDict(
            [("Connection", "close, X-Hop-Secret"), ("x-hop-secret", "1"), ("Accept", "*/*")]
        )
    )
    assert dict(upstream_headers(sent, credential=None)) == {"Accept": "*/*"}
    answered = CIMultiDictProxy(
        CIMultiDict([("Connection", "keep-alive, x-edge"), ("X-Edge", "1"), ("X-Kept", "2")])
    )
    assert dict(downstream_headers(answered, "rid")) == {"X-Kept": "2", "x-request-id": "rid"}


def test_the_provider_account_is_not_named_to_callers() -> None:
    """Every tenant's calls share llmtap's provider account: its organisation and project
    are not passed on to them; what the answer says about the call (its rate limits, its
    processing time) is."""
    answered = CIMultiDictProxy(
        CIMultiDict(
            [
                ("OpenAI-Organization", "org-platform"),
                ("openai-project", "proj_platform"),
                ("anthropic-organization-id", "0b1c-platform"),
                ("openai-processing-ms", "312"),
                ("x-ratelimit-remaining-requests", "4999"),
            ]
        )
    )
    assert dict(downstream_headers(answered, "rid")) == {
        "openai-processing-ms": "312",
        "x-ratelimit-remaining-requests": "4999",
        "x-request-id": "rid",
    }


def test_a_provider_key_read_with_its_newline_is_sent_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key from a file (a Kubernetes secret) often ends in a newline, which no header
    may hold: every call was a bare 500, recorded as ok."""
    monkeypatch.setenv("LLMTAP_TEST_KEY_NEWLINE", "sk-provider\n")
    provider = ProviderConfig(base_url="http://x", api_key_env="LLMTAP_TEST_KEY_NEWLINE")
    key = VirtualKey(id="k1", hash="0" * 64, tenant="acme")
    credential = upstream_credential(OPENAI, "openai", provider, Identity(Attribution(), key))
    assert credential == ("Authorization", "Bearer sk-provider")


async def test_the_key_file_is_followed_past_a_reload_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload failing in a way nobody foresaw is logged, and the file still followed:
    a follower that died would stop revocations taking effect, silently."""
    path = tmp_path / "keys.yaml"
    store = KeyStore(path)
    tries = 0
    reload = store.reload

    def failing_once() -> bool:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise RuntimeError("unforeseen")
        return reload()

    monkeypatch.setattr(store, "reload", failing_once)
    secret, _ = create_key(path, tenant="acme")
    following = asyncio.create_task(store.follow(0.01))
    try:
        async with asyncio.timeout(10):
            while store.lookup(secret) is None:
                await asyncio.sleep(0.01)
    finally:
        following.cancel()
    assert tries >= 2 and "reloading the key file" in caplog.text


@pytest.mark.parametrize(
    "credential", [("Authorization", b"Bearer ltk_\xff\xfe"), ("x-api-key", b"\xffltk_")]
)
async def test_a_credential_that_is_not_utf8_is_an_unknown_key(
    ingress: str, broker: Broker, upstream: FakeUpstream, credential: tuple[str, bytes]
) -> None:
    """Hashing it raised (a 500 internal_error on metered routes, aiohttp's bare text 500
    without x-request-id on the model list and unknown routes, none recorded). It is
    an unknown key: the 401 every route gives one, recorded under no one as those are."""
    before = len(upstream.provider.received)
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    json_ = ("Content-Type", b"application/json")
    chat = await raw_request(ingress, "POST", "/v1/chat/completions", [credential, json_], body)
    assert chat.status == 401, chat.body
    assert chat.json()["error"]["code"] == "invalid_api_key"
    event = await response_event(broker.bootstrap, chat.headers["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == ("refused", 401, "invalid_key")
    assert event.attribution == Attribution()

    messages = await raw_request(ingress, "POST", "/v1/messages", [credential, json_], body)
    assert messages.status == 401, messages.body
    assert messages.json()["error"]["type"] == "authentication_error"
    assert "x-request-id" in messages.headers

    models = await raw_request(ingress, "GET", "/v1/models", [credential])
    assert models.status == 401, models.body
    assert models.json()["error"]["code"] == "invalid_api_key"
    assert "x-request-id" in models.headers

    unknown = await raw_request(ingress, "GET", "/v1/files", [credential])
    assert unknown.status == 404, unknown.body
    assert unknown.json()["error"]["code"] == "unknown_url"
    event = await response_event(broker.bootstrap, unknown.headers["x-request-id"])
    assert (event.status, event.attribution) == ("bad_request", Attribution())
    assert len(upstream.provider.received) == before


def test_a_credential_that_is_not_utf8_has_a_key_id_in_passthrough(tmp_path: Path) -> None:
    """In passthrough, where its hash is what is recorded of it."""
    bad = b"Bearer sk-\xff".decode(errors="surrogateescape")
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": bad}))
    settings = Settings(data_dir=tmp_path, auth="passthrough")
    who = authenticate(headers, settings, KeyStore(settings.key_file)).attribution
    assert len(who.key_id) == 16 and who.key_id != call.key_id("sk-")
    assert who.key_id == call.key_id(bad.removeprefix("Bearer "))  # stable


@pytest.mark.parametrize("header", ["Authorization", "x-api-key", "api-key"])
def test_passthrough_attributes_a_call_to_the_key_of_any_credential_header(
    header: str, tmp_path: Path
) -> None:
    """Azure OpenAI's SDK sends its key as `api-key`: in passthrough such a call went on
    with it, recorded under no key (key_id ""), so `group_by=key` could not tell one
    Azure team's calls from another's. Its hash is its key_id, as a bearer token's."""
    value = "Bearer sk-team-a" if header == "Authorization" else "sk-team-a"
    settings = Settings(data_dir=tmp_path, auth="passthrough")
    headers = CIMultiDictProxy(CIMultiDict({header: value}))
    who = authenticate(headers, settings, KeyStore(settings.key_file)).attribution
    assert who.key_id == call.key_id("sk-team-a") != ""
    # With llmtap's keys, a virtual key sent there is known as in the others.
    keys_settings = Settings(data_dir=tmp_path)
    secret, key = create_key(keys_settings.key_file, tenant="acme")
    store = KeyStore(keys_settings.key_file)
    store.reload()
    value = f"Bearer {secret}" if header == "Authorization" else secret
    headers = CIMultiDictProxy(CIMultiDict({header: value}))
    assert authenticate(headers, keys_settings, store).attribution.key_id == key.id


def test_a_key_file_read_half_rewritten_never_frees_a_key_of_its_bounds(tmp_path: Path) -> None:
    """Rewritten in place (a shell's >, a config tool), a file read half written holds
    the keys written so far: one entry cut short became a key of the fields it had, the
    rest defaults. A key revoked, or bound to some models or rates, cut before those
    lines was live, of every model, unlimited, until the next reload. An entry cut
    anywhere must not pass for a key."""
    path = tmp_path / "keys.yaml"
    live, _ = create_key(path, tenant="acme")
    revoked, gone = create_key(path, tenant="acme")
    bound, _ = create_key(path, tenant="acme", allowed_models=("gpt-4o-mini",), rpm=1, tpm=10)
    revoke_key(path, gone.id)
    good = path.read_text()
    store = KeyStore(path)
    assert store.reload() and store.lookup(revoked) is None
    for cut in range(len(good)):
        path.write_text(good[:cut])  # as a reader may find it while it is rewritten
        store.reload()
        assert store.lookup(revoked) is None, good[:cut]
        key = store.lookup(bound)
        assert key is None or (key.allowed_models, key.rpm, key.tpm) == (
            ("gpt-4o-mini",),
            1,
            10,
        ), good[:cut]
    path.write_text(good)
    store.reload()
    assert store.lookup(live) is not None and store.lookup(bound) is not None
