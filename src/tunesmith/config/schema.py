"""How a config section is declared, documented and read from LLaMA-Factory's flat YAML keys.

A section is a dataclass with a `section` name; each field is one flat key, and the string literal
under the field is that key's documentation, the only copy of it: `tunesmith train --help` reads it
from the source with `ast`. A section may check its own values (`problems()`, returning
(key, message) pairs) and fill defaults that depend on other keys of the section (`resolve()`).

    @dataclass
    class DPOArgs:
        section: ClassVar[str] = "dpo"
        pref_beta: float = 0.1
        \"\"\"beta, how strongly the policy is held to the reference.\"\"\"
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path

import yaml

from tunesmith.errors import TunesmithError


def section_name(cls: type) -> str:
    """The section a dataclass declares (`section = "data"`), for --help and error messages."""
    return cls.__dict__.get("section", cls.__name__)


@functools.cache
def key_docs(cls: type) -> dict[str, str]:
    """{key: docstring} for the fields declared in `cls` itself (not inherited), read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): keys stay documented by name only
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def own_keys(cls: type) -> list[str]:
    """Keys declared in `cls` itself, in source order (a subclass's --help group shows only its own)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in inherited]


def key_types(cls: type) -> dict[str, object]:
    """{key: type annotation}, resolved (the modules use postponed annotations)."""
    return typing.get_type_hints(cls)


def from_flat(cls: type, raw: dict, where: dict[str, str], source: str) -> object:
    """An instance of section `cls` from the keys of `raw` it declares, each converted to its type."""
    hints = key_types(cls)
    values = {f.name: convert(f.name, raw[f.name], hints[f.name], where.get(f.name, source))
              for f in dataclasses.fields(cls) if f.name in raw}
    section = cls(**values)
    if hasattr(section, "resolve"):
        section.resolve()
    return section


def check(section: object, where: dict[str, str], source: str) -> None:
    """Raise the first problem the section reports, located at the line of the key it names."""
    for key, message in section.problems() if hasattr(section, "problems") else ():
        raise TunesmithError(f"{where.get(key, source)}: {message}")


def convert(key: str, value: object, hint: object, source: str) -> object:
    """Coerce a YAML value to the key's type; YAML 1.1 reads `1e-4` as a string, so numbers are parsed."""
    kind, optional = _kind(hint)
    if value is None:
        if optional:
            return None
        raise TunesmithError(f"{source}: `{key}` needs a {kind.__name__} value, got nothing.")
    try:
        return _CONVERTERS[kind](key, value)
    except (ValueError, TypeError):
        raise TunesmithError(f"{source}: `{key}` must be {describe(hint)}, got {value!r}.") from None


def choice_message(key: str, value: object, allowed: tuple[str, ...]) -> str:
    """The message for a value outside its choices, with the closest one."""
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"`{key}: {value}` is not supported; choose one of {', '.join(allowed)}.{hint}"


def describe(hint: object) -> str:
    """A key's type in words, for errors and --help."""
    kind, optional = _kind(hint)
    words = {list: "a comma list", dict: "a mapping name: value (name=value,name=value on the command line)",
             bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    return f"{words} (or empty)" if optional and kind not in (list, dict) else words


def _kind(hint: object) -> tuple[type, bool]:
    """(list | dict | bool | int | float | str, whether None is allowed) for a field's annotation."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    return typing.get_origin(kinds[0]) or kinds[0], len(kinds) < len(args)


def _to_list(key: str, value: object) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list) else None
    if items is None:
        raise ValueError
    return [str(item).strip() for item in items if str(item).strip()]


def _to_mapping(key: str, value: object) -> dict[str, str]:
    """A YAML mapping, or `name=value,name=value` (the command line's form); names keep their spelling."""
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError
        value = {name: text for name, _, text in pairs}
    if not isinstance(value, dict) or any(v is None or isinstance(v, (dict, list)) for v in value.values()):
        raise ValueError
    return {str(name).strip(): str(text).strip() for name, text in value.items()}


def _to_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError


def _to_number(kind: type):
    def parse(key: str, value: object) -> int | float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # accepts "1e-4", which YAML 1.1 leaves as text
        if not math.isfinite(number) or (kind is int and not number.is_integer()):
            raise ValueError
        return int(number) if kind is int else number
    return parse


def _to_str(key: str, value: object) -> str | None:
    if key == "resume_from_checkpoint" and isinstance(value, bool):
        return "true" if value else None
    if isinstance(value, (dict, list)):
        raise ValueError
    return str(value)


_CONVERTERS = {list: _to_list, dict: _to_mapping, bool: _to_bool, int: _to_number(int), float: _to_number(float), str: _to_str}


def read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    """The mapping in `path`, and for each key where it stands ("cfg.yaml, line 7") for error messages."""
    if not path.is_file():
        raise TunesmithError(f"Config file {path} does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TunesmithError(f"Config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise TunesmithError(f"Config file {path} must be a mapping of key: value lines, not a {type(data).__name__}.")
    where = {key.value: f"{path}, line {key.start_mark.line + 1}" for key, _ in node.value}
    return data, where


def apply_overrides(raw: dict, where: dict[str, str], overrides: list[str]) -> None:
    """`key=value` command-line overrides into `raw` (values parsed as YAML), each located for errors."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TunesmithError(f"Override {item!r} is not of the form key=value (e.g. learning_rate=1e-4).")
        raw[key.strip()] = yaml.safe_load(value) if value.strip() else None
        where[key.strip()] = f"command-line override `{item}`"
