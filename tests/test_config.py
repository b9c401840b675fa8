"""Settings: embedded defaults, a YAML file, env overrides; and the README keeps up."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmtap.config import CONFIG_ENV, Settings

README = Path(__file__).parent.parent / "README.md"


def test_env_overrides_yaml_which_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "llmtap.yaml"
    config.write_text("proxy_port: 9000\napi_port: 9001\nopenai_base_url: http://yaml/v1/\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("LLMTAP_OPENAI_BASE_URL", "http://env/v1")
    settings = Settings()
    assert settings.proxy_port == 9000  # from the file
    assert settings.api_port == 9001
    assert settings.openai_base_url == "http://env/v1"  # env wins
    assert settings.anthropic_base_url == "https://api.anthropic.com"  # default


def test_a_bad_value_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_PROXY_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="proxy_port"):
        Settings()


def test_two_budgets_of_one_name_are_refused() -> None:
    """A budget's state is published, enforced and stored by its name: two budgets of one
    name would count into one state with either's limit."""
    budget = {"name": "x", "scope": "team", "value": "search", "limit_usd": "10"}
    with pytest.raises(ValidationError, match="budget names must be unique"):
        Settings(budgets=[budget, {**budget, "value": "ads"}])


def test_two_spike_rules_of_one_name_are_refused() -> None:
    rule = {"name": "x", "dimension": "team", "metric": "cost"}
    Settings(spike_rules=[rule, {**rule, "name": "y"}])
    with pytest.raises(ValidationError, match="spike rule names must be unique"):
        Settings(spike_rules=[rule, {**rule, "metric": "requests"}])


def test_an_unknown_key_in_the_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "llmtap.yaml"
    config.write_text("proxy_prot: 9000\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    with pytest.raises(ValidationError, match="proxy_prot"):
        Settings()


def test_embedded_store_lives_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.store_dsn == f"chdb:///{tmp_path.resolve() / 'clickhouse'}"
    assert settings.embedded_store
    assert not Settings(clickhouse_dsn="http://ch:8123/llmtap").embedded_store


def test_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", README.read_text(), re.M))
    names = {name for pair in documented for name in pair if name}
    assert set(Settings.model_fields) - names == set()


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_read_wherever_it_is_given(
    where: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """`llmtap --config F keys list` and `llmtap keys --config F list` read the same file."""
    from ingress.guards.keys import create_key

    keys_file = tmp_path / "team-keys.yaml"
    config = tmp_path / "llmtap.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nkeys_file: {keys_file}\n")
    _, key = create_key(keys_file, tenant="acme")
    argv = ["--config", str(config), "keys", "list"]
    if where == "after":
        argv = ["keys", "--config", str(config), "list"]
    assert cli(argv) == 0
    assert key.id in capsys.readouterr().out
