"""Reading a run's config: YAML files (`base:` includes, repeated keys refused), `a.b=c` overrides from the
command line, and validation into `RunConfig` with one line per mistake (an unknown key names the closest
valid one)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from common.config import ConfigError, RunConfig


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    """Valid keys at a dotted location of the tree (for suggestions)."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return list(model.model_fields)


# Keys renamed since an earlier release: (section, old) -> new.
RENAMED = {("algorithm", old): f"wdpo_{old}" for old in ("beta2", "weight_fn", "normalize_weights")}


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden" and tuple(map(str, loc)) in RENAMED:
        return f"config key '{key}' was renamed '{loc[0]}.{RENAMED[tuple(map(str, loc))]}'; use the new name"
    if err["type"] == "extra_forbidden":
        valid = _field_names(RunConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"unknown config key '{key}'. {hint} Valid keys here: {', '.join(valid)}".replace("  ", " ")
    if err["type"] == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return f"config key '{key}': {err['msg']} (got {err.get('input')!r})"


def _coerce(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, null, lists)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example iterations=4)")
        key, value = item.split("=", 1)
        try:
            parsed = _coerce(value)
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({problem}); check its quotes and brackets, e.g. "
                "train.resources='{trainer_node: 1}' in a shell"
            ) from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = parsed
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """A config file as a dict; `base: other.yaml` (relative to the file) is loaded first and overlaid."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; see configs/ for examples")
    if p.resolve() in _seen:
        raise ConfigError(f"config file '{p}' includes itself through 'base'")
    try:
        text = p.read_text(encoding="utf-8")
        _refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader), p)
        tree = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of keys, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is not None:
        tree = _merge(read_yaml_tree(p.parent / base, (*_seen, p.resolve())), tree)
    return tree


def _refuse_repeated_keys(node, path: Path, where: str = "") -> None:
    """A key given twice in one mapping (YAML keeps the last silently): one line naming it and both lines."""
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            key = f"{where}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(
                    f"config file '{path}': '{key}' is given twice (lines {first[key]} and {line}); keep one"
                )
            first[key] = line
            _refuse_repeated_keys(value_node, path, f"{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, path, where)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or the defaults when `path` is None), apply overrides, validate."""
    tree = read_yaml_tree(path) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    return validate_config(tree)


def validate_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError("\n".join(_format_error(err) for err in e.errors())) from None
