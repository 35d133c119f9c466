"""Recipes: named quantization rules stored as YAML in ``configs/``.

A recipe is data, not code; it maps one-to-one onto rules of ``QuantSpec``::

    name: rtn-w4-g64
    description: ...
    rules:
      - pattern: "(q|k|v|o|gate|up|down)_proj/kernel$"
        spec: {bits: 4, group_size: 64, symmetric: false}
      - pattern: "embed_tokens"
        spec: null          # keep in float

``load_recipe`` accepts a path or the name of a file in ``configs/`` (with or without
``.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from jquant.errors import SpecError
from jquant.spec import QuantSpec, Rule

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[Rule, ...]
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "calibration": dict(self.calibration),
                "rules": [{"pattern": p, "spec": None if s is None else s.to_dict()} for p, s in self.rules]}


def available() -> list[str]:
    """Names of the recipes shipped in ``configs/``."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


RECIPE_KEYS = ("name", "description", "calibration", "rules")
RULE_KEYS = ("pattern", "spec")
# Calibration settings of data-driven recipes: key -> (type, lowest valid value or None).
CALIBRATION_KEYS = {"text": (str, None), "windows": (int, 1), "seq_len": (int, 2), "seed": (int, 0),
                    "batch_size": (int, 1)}


def check_calibration(cal, source: str) -> dict[str, Any]:
    if cal is None:
        return {}
    if not isinstance(cal, dict):
        raise SpecError(f"{source}: 'calibration' must be a mapping, got {type(cal).__name__}")
    unknown = set(cal) - set(CALIBRATION_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown calibration key(s) {sorted(unknown)}; valid: {', '.join(CALIBRATION_KEYS)}")
    for k, v in cal.items():
        typ, lowest = CALIBRATION_KEYS[k]
        if not isinstance(v, typ) or isinstance(v, bool):
            raise SpecError(f"{source}: calibration {k}={v!r} must be {'an integer' if typ is int else 'a string'}")
        if lowest is not None and v < lowest:
            raise SpecError(f"{source}: calibration {k}={v!r} must be >= {lowest}")
    return dict(cal)


def recipe_from_dict(d: dict[str, Any], source: str = "<dict>") -> Recipe:
    """A Recipe from its mapping; every key is checked (a misspelt one is an error, never ignored)."""
    if not isinstance(d, dict) or "rules" not in d:
        raise SpecError(f"{source}: a recipe needs a 'rules' list")
    unknown = set(d) - set(RECIPE_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown recipe key(s) {sorted(unknown)}; valid: {', '.join(RECIPE_KEYS)}")
    if not isinstance(d["rules"], list):
        raise SpecError(f"{source}: 'rules' must be a list of {{pattern, spec}} entries, got {type(d['rules']).__name__}")
    rules = []
    for i, r in enumerate(d["rules"]):
        if not isinstance(r, dict) or "pattern" not in r or "spec" not in r:
            raise SpecError(f"{source}: rule {i} needs 'pattern' and 'spec' keys, got {r!r}")
        extra = set(r) - set(RULE_KEYS)
        if extra:
            raise SpecError(f"{source}: rule {i} has unknown key(s) {sorted(extra)}; valid: {', '.join(RULE_KEYS)}")
        if not isinstance(r["pattern"], str):
            raise SpecError(f"{source}: rule {i}: pattern must be a string, got {r['pattern']!r}")
        if r["spec"] is not None and not isinstance(r["spec"], dict):
            raise SpecError(f"{source}: rule {i} ({r['pattern']!r}): spec must be a mapping or null, got {r['spec']!r}")
        try:
            spec = None if r["spec"] is None else QuantSpec.from_dict(r["spec"])
        except SpecError as e:
            raise SpecError(f"{source}: rule {i} ({r['pattern']!r}): {e}") from e
        except TypeError as e:  # a value of the wrong type deep in a comparison
            raise SpecError(f"{source}: rule {i} ({r['pattern']!r}): {e}") from e
        rules.append((r["pattern"], spec))
    return Recipe(name=str(d.get("name", os.path.basename(source))), description=str(d.get("description", "")),
                  rules=tuple(rules), calibration=check_calibration(d.get("calibration"), source))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe from a YAML path or a name in ``configs/``."""
    path = name_or_path
    if not os.path.isfile(path):
        cand = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
        if not os.path.isfile(cand):
            raise SpecError(f"no recipe {name_or_path!r}: not a file, and not one of {', '.join(available())}")
        path = cand
    with open(path) as fh:
        try:
            d = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: invalid YAML: {e}") from e
    return recipe_from_dict(d, path)
