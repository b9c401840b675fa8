"""Alert -> webhook body, by a Jinja2 template. Pure once a template is loaded.

Built-ins ship as package data (``templates/*.j2``): ``json`` (the full alert, as
published), ``slack`` (an incoming-webhook message with Block Kit ``blocks``) and
``text`` (one short line). Any other name is the path of a Jinja2 file. A template
sees ``alert``: the alert as JSON-ready values (decimals, unpadded, and times as strings), and
has the filters ``tojson``, ``slack_escape`` and ``oneline``. An undefined name is an error, not "".
Templates run in Jinja2's immutable sandbox: a template file reaches no Python internals
(``cycler.__init__.__globals__`` would reach ``os``) and changes nothing, and ``range``
is bounded; what it breaks is a ``TemplateError`` (the delivery is refused, unsent:
worker.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmtap.amounts import plain
from llmtap.events import Alert

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BUILTIN: dict[str, str] = {"json": JSON, "slack": JSON, "text": TEXT}


@dataclass(frozen=True)
class Template:
    source: str  # a built-in's name, or the file's path
    jinja: jinja2.Template
    content_type: str | None  # None: a custom file; decided from what it renders


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str


def slack_escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn reserves for links and mentions."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def oneline(text: str) -> str:
    """The text on one line: each line break (any Unicode one) a space."""
    return " ".join(str(text).splitlines())


def _environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["slack_escape"] = slack_escape
    env.filters["oneline"] = oneline
    return env


_builtins = _environment(jinja2.PackageLoader("sinks.webhooks", "templates"))


@cache
def load(spec: str) -> Template:
    """A built-in by name, or a Jinja2 file by path; raises if it does not compile."""
    if spec in BUILTIN:
        return Template(spec, _builtins.get_template(f"{spec}.j2"), BUILTIN[spec])
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"webhook template {spec!r}: not a built-in, and no such file")
    env = _environment(jinja2.FileSystemLoader(path.parent))
    try:
        return Template(str(path), env.get_template(path.name), None)
    except UnicodeDecodeError as exc:
        raise jinja2.TemplateError(f"webhook template {spec!r} is not UTF-8 text: {exc}") from exc


def _sniff(text: str) -> str:
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # a run of brackets too deep: not JSON to send
        return TEXT
    return JSON if isinstance(parsed, dict | list) else TEXT


# The alert's decimals, shown unpadded (a spike's are quantized to nine places, a
# budget's spend read back from ClickHouse has nine).
_DECIMALS = ("observed", "baseline", "threshold")


def render(template: Template, alert: Alert) -> Body:
    """The body for one alert (raises jinja2.TemplateError on a template error, also
    one Python raises inside it: ``{{ alert.observed + 1 }}`` adds to a string)."""
    fields = alert.model_dump(mode="json")
    for name in _DECIMALS:  # "30", not "30.000000000": exact, unpadded
        if (value := getattr(alert, name)) is not None:
            fields[name] = plain(value)
    try:
        text = template.jinja.render(alert=fields).strip()
        data = text.encode()  # a lone surrogate (a "\ud83d" literal) does not encode
    except jinja2.TemplateError:
        raise
    except Exception as exc:
        raise jinja2.TemplateRuntimeError(f"{type(exc).__name__}: {exc}") from exc
    return Body(data, template.content_type or _sniff(text))
