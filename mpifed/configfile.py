"""Run configurations in and out of text: TOML files read and type-checked against the dataclasses of
`mpifed.config`, `--set section.key=value` overrides, and `dump_toml`, which writes a resolved
configuration back so that every run leaves a file that reproduces it. Unknown sections, keys and
facilities are errors that list the valid ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

from mpifed.config import ENGINE_SECTIONS, SECTIONS, ConfigError, FacilityConfig, RunConfig, default_facilities


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(where: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """`value` checked against a field's type: str, int, float (ints accepted), bool, a `Literal` (its
    values' type; which value is validated with the section), `X | None`, tuple[str, ...] (a TOML list
    of strings) or a nested dataclass (a table). Appends a problem and returns None on a mismatch."""
    if dataclasses.is_dataclass(hint):
        return load_table(hint, value, where, problems)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{where}: expected a list of strings")
        return None
    kind = type(typing.get_args(hint)[0]) if typing.get_origin(hint) is Literal else hint
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    problems.append(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return None


def table_fields(cls: type, table: Any, where: str, problems: list[str], skip: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` that a parsed TOML table gives, each type-checked; keys
    in `skip` are left to the caller. Problems (an unknown key, listing the valid ones; a wrong type)
    are appended to `problems`, each naming its dotted key under `where`. The one TOML-to-dataclass
    path, shared by run configurations and site profiles."""
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table, got {type(table).__name__}")
        return {}
    hints = typing.get_type_hints(cls)
    valid = [name for name in _valid_keys(cls) if name not in skip]
    kwargs = {}
    for key, value in table.items():
        here = f"{where}.{key}" if where else key
        if key in skip:
            continue
        if key not in valid:
            problems.append(f"{here}: unknown key; valid keys: {', '.join(valid)}")
            continue
        coerced = _coerce(here, value, hints[key], problems)
        if coerced is not None:
            kwargs[key] = coerced
    return kwargs


def load_table(cls: type, table: Any, where: str, problems: list[str]) -> Any:
    """`table_fields` made into an instance of `cls` (the defaults fill what is missing or wrong)."""
    return cls(**table_fields(cls, table, where, problems))


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from parsed TOML; raises ConfigError listing every problem."""
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for key, table in data.items():
        if key in SECTIONS:
            parts[key] = load_table(SECTIONS[key], table, key, problems)
        elif key == "facility":
            if not isinstance(table, list):
                problems.append("facility: expected an array of tables ([[facility]])")
                continue
            parts["facility"] = [load_table(FacilityConfig, t, f"facility.{i}", problems)
                                 for i, t in enumerate(table)]
        else:
            problems.append(f"{key}: unknown section; valid sections: {', '.join([*SECTIONS, 'facility'])}")
    if problems:
        raise ConfigError("; ".join(problems))
    return RunConfig(**parts)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_sets(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """`cfg` with `--set`-style assignments applied, validated again (ConfigError when they do not hold)."""
    data = {key: ({k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value)
            for key, value in to_dict(cfg).items()}  # unset keys stay unset: their default applies
    return from_dict(apply_sets(data, assignments))


def load(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file into a plain dict; errors name the file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _parse_value(text: str) -> Any:
    """A TOML value (`3`, `1e-3`, `true`, `"x"`); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_sets(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or `facility.NAME.key=value`) overrides to parsed TOML.

    Unknown sections, keys and facilities are errors that list the valid ones.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain TOML data
    problems = []
    for item in assignments:
        path, sep, text = item.partition("=")
        parts = path.strip().split(".")
        value = _parse_value(text.strip())
        if not sep or len(parts) < 2 or not all(parts):
            problems.append(f"--set {item!r}: expected section.key=value")
        elif parts[0] == "facility":
            problems += _set_facility(data, item, parts, value)
        elif parts[0] not in SECTIONS:
            problems.append(f"--set {item!r}: unknown section {parts[0]!r}; "
                            f"valid sections: {', '.join([*SECTIONS, 'facility'])}")
        elif len(parts) != 2 or parts[1] not in _valid_keys(SECTIONS[parts[0]]):
            problems.append(f"--set {item!r}: unknown key {path.strip()!r}; valid keys: "
                            + ", ".join(f"{parts[0]}.{k}" for k in _valid_keys(SECTIONS[parts[0]])))
        else:
            data.setdefault(parts[0], {})[parts[1]] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return data


def _set_facility(data: dict[str, Any], item: str, parts: list[str], value: Any) -> list[str]:
    facilities = data.setdefault("facility", [dataclasses.asdict(f) for f in default_facilities()])
    names = [str(f.get("name", "")) for f in facilities]
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[2] not in ENGINE_SECTIONS):
        return [f"--set {item!r}: expected facility.NAME.key=value or facility.NAME.{{fsdp,deepspeed}}.key=value"]
    who, keys = parts[1], parts[2:]
    index = names.index(who) if who in names else int(who) if who.isdigit() and int(who) < len(names) else None
    if index is None:
        return [f"--set {item!r}: no facility {who!r}; facilities: {', '.join(names)}"]
    valid = _valid_keys(ENGINE_SECTIONS[keys[0]] if len(keys) == 2 else FacilityConfig)
    if keys[-1] not in valid:
        prefix = ".".join(["facility", who, *keys[:-1]])
        return [f"--set {item!r}: unknown key {keys[-1]!r}; valid keys: " + ", ".join(f"{prefix}.{k}" for k in valid)]
    target = facilities[index]
    if len(keys) == 2:
        target = target.setdefault(keys[0], {})
    target[keys[-1]] = value
    return []


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string that reads back as `text`, whatever it holds: characters beyond the BMP as
    themselves (JSON's surrogate-pair escapes are not TOML), control characters escaped. A lone
    surrogate (bytes of a path that are not UTF-8, as Python decodes them) has no TOML form at all."""
    out = []
    for char in text:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            raise ConfigError(f"{text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text, which a TOML file "
                              "must hold; rename it")
        out.append(_ESCAPES.get(char) or (f"\\u{code:04x}" if code < 0x20 or code == 0x7F else char))
    return '"' + "".join(out) + '"'



def dump_toml(cfg: RunConfig) -> str:
    """The resolved configuration as TOML that `load` + `from_dict` read back to an equal RunConfig."""
    data = to_dict(cfg)
    lines = ["# Resolved mpifed run configuration (rerun with: mpifed simulate --config THIS_FILE)"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in data[section].items()
                                         if v is not None]  # unset: the documented default applies
    for fac in data["facility"]:
        lines += ["", "[[facility]]"] + [f"{k} = {_toml_value(v)}" for k, v in fac.items()]
    return "\n".join(lines) + "\n"


# Keys that may differ between the sites of one federation (paths, and how each site finds the others).
SITE_KEYS = {"model": ("path",), "data": ("path",), "checkpoint": ("dir",), "metrics": ("file", "tensorboard", "wandb"),
             "federation": ("rendezvous", "join_timeout_s", "token_file"), "facility": ("site",)}


# The keys that name a file or folder at a site (and each facility's deepspeed.config): `$VAR`, `${VAR}`
# and a leading `~` in them are expanded where the run starts (`expanded`), so that one project file
# serves sites whose scratch and work folders differ.
PATH_KEYS = {"model": ("path",), "data": ("path",), "checkpoint": ("dir",), "metrics": ("file", "tensorboard"),
             "federation": ("rendezvous", "token_file")}
_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def expanded(cfg: RunConfig, environ: Mapping[str, str] = os.environ) -> tuple[RunConfig, list[str]]:
    """`cfg` with its PATH_KEYS expanded against `environ`, and one problem per variable not set there
    (the path is then left as written)."""
    problems: list[str] = []

    def expand(where: str, text: str) -> str:
        def value(match: re.Match) -> str:
            name = match.group(1).strip("{}")
            if name in environ:
                return environ[name]
            problems.append(f"{where}: {text!r} uses ${name}, which is not set here; set it in the job's "
                            "environment (or the site profile's [env]), or write the path itself")
            return match.group(0)
        out = _VARIABLE.sub(value, text)
        return os.path.expanduser(out) if out.startswith("~") else out

    sections = {section: dataclasses.replace(getattr(cfg, section), **{
        key: expand(f"{section}.{key}", setting(cfg, f"{section}.{key}")) for key in keys})
        for section, keys in PATH_KEYS.items()}
    facilities = [dataclasses.replace(f, deepspeed=dataclasses.replace(
        f.deepspeed, config=expand(f"facility.{f.name}.deepspeed.config", f.deepspeed.config))) for f in cfg.facility]
    return dataclasses.replace(cfg, **sections, facility=facilities), problems


def setting(cfg: RunConfig, key: str) -> Any:
    """The value of a section's `key` ("train.lr", as --set names it) in `cfg`."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _agreed(cfg: RunConfig) -> dict[str, Any]:
    """The configuration as plain data, without SITE_KEYS: what every site must agree on."""
    data = to_dict(cfg)
    for section, keys in SITE_KEYS.items():
        for table in data[section] if section == "facility" else [data[section]]:
            for key in keys:
                table.pop(key, None)
    return data


def digest(cfg: RunConfig) -> str:
    """sha256 of everything in the configuration that every site must agree on (not SITE_KEYS)."""
    return hashlib.sha256(json.dumps(_agreed(cfg), sort_keys=True).encode()).hexdigest()


def settings(cfg: RunConfig) -> dict[str, str]:
    """What `digest` covers, one entry a key ("train.lr", "facility.b.ranks") with its value as JSON:
    what a site shows another so that a mismatch can name the keys (the configuration holds no secret:
    the token is never in it)."""
    data = _agreed(cfg)
    flat = {f"{section}.{key}": json.dumps(value) for section in SECTIONS for key, value in data[section].items()}
    for fac in data["facility"]:
        flat.update({f"facility.{fac['name']}.{key}": json.dumps(value) for key, value in fac.items()})
    return flat
