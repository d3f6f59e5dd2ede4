"""Command-line flags derived from the config models, so ``--help`` and the configs cannot drift apart.

Every leaf key of a command's config is a flag named by its dotted key (``--attack.n_iter``), typed and
helped from its pydantic field (type, choices, ``Field(description=...)``); a few short aliases
(``--eps`` for ``attack.eps``) are kept for the common keys. Lists of sub-configs (``models``, ``methods``,
``pairs``) and free-form mappings are set in the YAML file. Flags override the YAML file key by key. Why a
walk over pydantic's fields into argparse rather than pydantic-settings' CLI or jsonargparse: both own the
parse and its errors, while the exit-2 contract, flag-named messages, model specs and the README's commands
need ours; the walk is the only part they would have saved.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from rcat_ray.config import deep_merge, load_yaml
from rcat_ray.errors import ConfigError

__all__ = ["Alias", "Flag", "add_config_flags", "config_dict", "config_flags", "overrides", "parse_model_spec"]


@dataclass(frozen=True)
class Flag:
    """One config key as a flag: ``kind`` is ``value``, ``csv`` (a list, comma-separated), ``bool`` or ``spec``
    (a model spec such as ``builtin:mlp`` that expands to a model section)."""

    key: str
    kind: str
    type: Any = str
    choices: tuple | None = None
    help: str = ""


@dataclass(frozen=True)
class Alias:
    """A short flag for a config key (``--eps`` -> ``attack.eps``); ``kind='spec'`` reads a model spec and
    ``append`` collects several (``--model`` for ``models``)."""

    flag: str
    key: str
    kind: str = ""
    append: bool = False


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])[0], True
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation, False


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _scalar(tp: Any) -> tuple[Any, tuple | None] | None:
    """(argparse type, choices) of a scalar annotation, or None when it is not one."""
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        return type(values[0]), tuple(values)
    if tp in (int, float, str):
        return tp, None
    return None


def config_flags(model: type[BaseModel], prefix: str = "") -> dict[str, Flag]:
    """Every leaf key of ``model`` (nested sections included) as a :class:`Flag`, by dotted key."""
    flags: dict[str, Flag] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        tp, _optional = _unwrap(field.annotation)
        helptext = field.description or ""
        if _is_model(tp):
            flags |= config_flags(tp, f"{key}.")
            continue
        if tp is bool:
            flags[key] = Flag(key, "bool", bool, None, helptext)
            continue
        origin = typing.get_origin(tp)
        if origin in (tuple, list):
            items = [a for a in typing.get_args(tp) if a is not Ellipsis]
            inner = _scalar(items[0]) if len(items) == 1 else None
            if inner is not None:
                flags[key] = Flag(key, "csv", inner[0], inner[1], helptext)
            continue  # a list of sections: YAML only
        scalar = _scalar(tp)
        if scalar is not None:
            flags[key] = Flag(key, "value", scalar[0], scalar[1], helptext)
    return flags


def _help(flag: Flag, alias_of: str = "") -> str:
    text = flag.help or flag.key
    if flag.choices and not any(str(c) in text for c in flag.choices):
        text += f" ({', '.join(map(str, flag.choices))})"
    if flag.kind == "csv":
        text += " (comma-separated)"
    return f"{text} [{alias_of or flag.key}]"


def add_config_flags(
    parser: argparse.ArgumentParser, flags: dict[str, Flag], aliases: tuple[Alias, ...] = ()
) -> dict[str, str]:
    """Add the aliases, then every key's own flag (in a group of its own); return key -> the flag to name in
    error messages (the alias where there is one)."""
    named: dict[str, str] = {}
    for a in aliases:
        flag = flags.get(a.key)
        if a.kind == "spec":
            parser.add_argument(
                a.flag,
                dest=a.key,
                metavar="SPEC",
                action="append" if a.append else "store",
                default=None,
                help=f"model spec: robustbench:NAME, builtin:ARCH or a checkpoint path [{a.key}]",
            )
        elif flag is None:
            raise ValueError(f"alias {a.flag} names {a.key}, which is not a key of this command's config")
        else:
            _add(parser, a.flag, flag, alias_of=flag.key)
        named[a.key] = a.flag
    group = parser.add_argument_group("every config key (overrides --config)")
    taken = {a.flag for a in aliases}
    for key, flag in flags.items():
        if not {f"--{key}", f"--{key.replace('_', '-')}"} & taken:  # ``--store``, ``--chunk-size``: the alias is it
            _add(group, f"--{key}", flag)
        named.setdefault(key, f"--{key}")
    return named


def _add(parser: Any, name: str, flag: Flag, alias_of: str = "") -> None:
    if flag.kind == "bool":
        parser.add_argument(
            name, dest=flag.key, action=argparse.BooleanOptionalAction, default=None, help=_help(flag, alias_of)
        )
    elif flag.kind == "csv":
        parser.add_argument(name, dest=flag.key, type=str, default=None, metavar="A,B", help=_help(flag, alias_of))
    else:
        parser.add_argument(
            name,
            dest=flag.key,
            type=flag.type,
            default=None,
            choices=flag.choices,
            metavar=None if flag.choices else flag.type.__name__.upper(),
            help=_help(flag, alias_of),
        )


def parse_model_spec(spec: str) -> dict[str, Any]:
    """``robustbench:NAME``, ``builtin:ARCH``, ``checkpoint:PATH`` or a bare ``*.pt``/``*.pth`` path."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("robustbench", "builtin"):
        return {"source": kind, "name": rest}
    if sep and kind in ("checkpoint", "ckpt"):
        return {"source": "checkpoint", "path": rest}
    if spec.endswith((".pt", ".pth")):
        return {"source": "checkpoint", "path": spec}
    raise ConfigError(
        f"cannot read model spec '{spec}': use robustbench:NAME, builtin:ARCH or checkpoint:PATH (or a .pt path)"
    )


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def overrides(args: argparse.Namespace, flags: dict[str, Flag], aliases: tuple[Alias, ...] = ()) -> dict[str, Any]:
    """The nested config dict the given flags set (model specs expanded, lists split at commas)."""
    out: dict[str, Any] = {}
    for a in aliases:
        value = getattr(args, a.key, None)
        if a.kind == "spec" and value is not None:
            _set_dotted(out, a.key, [parse_model_spec(v) for v in value] if a.append else parse_model_spec(value))
    for key, flag in flags.items():
        value = getattr(args, key, None)
        if value is None:
            continue
        if flag.kind == "csv":
            value = [flag.type(v.strip()) for v in value.split(",") if v.strip()]
        _set_dotted(out, key, value)  # after a spec alias, so ``--old X --old.arch_kwargs...`` refines the spec
    return out


def config_dict(args: argparse.Namespace, flags: dict[str, Flag], aliases: tuple[Alias, ...] = ()) -> dict[str, Any]:
    """``--config`` (when given) with the flags laid over it."""
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return deep_merge(base, overrides(args, flags, aliases))
