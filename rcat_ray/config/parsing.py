"""Reading configs: YAML files, flags merged over them, validation errors a user can act on, and the stable hash
every cache key is made of."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rcat_ray.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError, cls: type[BaseModel], flags: dict[str, str] | None = None) -> str:
    """One line per bad field; a field that has a command-line flag is named by its flag first."""
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        flag = (flags or {}).get(where)
        if item["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(item["loc"], cls)
        if item["type"] == "missing":
            lines.append(f"  {flag} is required (config key {where})" if flag else f"  {where} is required")
        else:
            lines.append(f"  {flag} ({where}): {msg}" if flag else f"  {where}: {msg}")
    return f"invalid {cls.__name__}:\n" + "\n".join(lines)


#: Keys that moved into a section (a config written for an earlier version is told where they went).
_MOVED_KEYS = {
    "num_workers": "compute.num_workers",
    "use_gpu": "compute.gpus_per_worker",
    "cpus_per_worker": "compute.cpus_per_worker",
    "threads_per_worker": "compute.threads_per_worker",
    "address": "compute.address",
    "selection": "choice",
    "finetune_workers": "finetune_compute.num_workers",
}


def _suggest(loc: tuple, cls: type[BaseModel]) -> str:
    """Find the intended key of a misspelt one by walking the config classes along the error path."""
    model: Any = cls
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            args = getattr(ann, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    moved = _MOVED_KEYS.get(str(loc[-1]))
    if moved and moved.split(".")[0] in model.model_fields:
        return f" (now '{'.'.join([*map(str, loc[:-1]), moved])}')"
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_config(cls: type[C], data: dict[str, Any], *, flags: dict[str, str] | None = None) -> C:
    """Validate a plain dict into ``cls``, raising ConfigError with every bad field named.

    ``flags`` maps dotted config keys to the command-line flags that set them, so a user who typed flags
    reads ``--eps is required`` rather than a config key they never wrote.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, cls, flags)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or a non-mapping document."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open() as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not text (UTF-8 YAML expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``override`` on ``base`` key by key (flags over a YAML file)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, written next to results so a run can be repeated."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash that only depends on content (sorted keys, JSON form): the basis of cache keys."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ----------------------------------------------------------------------------------------------------
# Fine-tuning (RCAT and its baselines)
