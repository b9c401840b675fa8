"""Where settings are read from: the config file (YAML, read by :class:`UniqueKeys`)
and the environment (:class:`Environment`), each a whole value under what a source
above it sets (:class:`Overridden`). :class:`llmtap.config.Settings` puts them in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    YamlConfigSettingsSource,
)


def refuse_duplicate_keys(loader: Any, node: yaml.MappingNode, deep: bool = False) -> None:
    """Raise a ConstructorError for a key given twice in the mapping ``node`` (YAML 1.2
    requires them unique; PyYAML's loaders keep the last without a word), as a
    ``construct_mapping`` of ``loader`` does first."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<": merged keys may be overridden, as YAML's merge allows
        key = loader.construct_object(key_node, deep=deep)
        try:
            again = key in seen
        except TypeError:  # unhashable: the loader's own error says so below
            continue
        if again:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)


class UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping key given twice (a second ``budgets:``
    block dropped the first's budgets, a provider defined twice its first definition)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        refuse_duplicate_keys(self, node, deep)
        return super().construct_mapping(node, deep)


class YamlFile(YamlConfigSettingsSource):
    """The config file, read by :class:`UniqueKeys`."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        with open(file_path, encoding=self.yaml_file_encoding or "utf-8") as yaml_file:
            return yaml.load(yaml_file, Loader=UniqueKeys) or {}


class Environment(EnvSettingsSource):
    """The ``LLMTAP_*`` variables. An empty one of a setting they give as JSON (a list or
    a map: ``LLMTAP_PROVIDERS=``, as compose's ``${VAR:-}`` gives it) is no setting, as
    if unset (the file's, or the default, holds): "" is no JSON, and stopped llmtap."""

    def json_settings(self) -> frozenset[str]:
        """The settings this source reads as JSON: the lists and the maps."""
        fields = self.settings_cls.model_fields.items()
        return frozenset(name for name, field in fields if self._field_is_complex(field)[0])

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        if value == "" and (value_is_complex or self._field_is_complex(field)[0]):
            value = None  # what the source gives for a variable unset: None, left out
        return super().prepare_field_value(field_name, field, value, value_is_complex)


class Overridden(PydanticBaseSettingsSource):
    """A source's settings less those a source above it sets: those replace its whole.
    pydantic-settings merges maps across sources, so a map in the file (``model_routes``,
    ``providers``) kept its entries under the environment's, and
    ``LLMTAP_PROVIDERS='{}'`` could remove none (README: the environment wins).

    An empty value of a setting in ``empty_is_default`` is no setting (the file's, or
    the default, holds)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        source: PydanticBaseSettingsSource,
        above: tuple[PydanticBaseSettingsSource, ...],
        empty_is_default: frozenset[str],
    ) -> None:
        super().__init__(settings_cls)
        self._source = source
        self._above = above
        self._empty_is_default = empty_is_default

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        taken = {name for source in self._above for name, value in self._set(source())}
        return {name: value for name, value in self._set(self._source()) if name not in taken}

    def _set(self, settings: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """What a source sets."""
        empty_is_default = self._empty_is_default
        return ((n, v) for n, v in settings.items() if not (v == "" and n in empty_is_default))
