"""Recipes: named quantization rules stored as YAML in ``configs/``.

A recipe is data, not code; it maps one-to-one onto rules of ``QuantSpec``::

    name: rtn-w4-g64
    description: ...
    rules:
      - pattern: "(q|k|v|o|gate|up|down)_proj/kernel$"
        spec: {bits: 4, group_size: 64, symmetric: false}
      - pattern: "embed_tokens"
        spec: null          # keep in float

A weight rule may also name the decoder layers it applies to (``layers:``): a list of
indices (negative ones count from the end) or ``more_bits``, llama.cpp's layer set for its
``_M`` mixes (``use_more_bits``: the first and last eighth of the layers and every third layer
between). Such a recipe is bound to a model's layer count with :meth:`Recipe.for_model`,
which turns each selection into a plain pattern (``^layers/(?:0|1|5)/`` before the rule's
own); the CLI does that right after loading the model.

``load_recipe`` accepts a path or the name of a file in ``configs/`` (with or without
``.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import yaml

from jquant.activations import ActQuantSpec
from jquant.errors import SpecError, short
from jquant.qat.train import QATConfig
from jquant.rotations.quarot import RotationSpec
from jquant.spec import QuantSpec, Rule

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[Rule, ...]
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    activations: tuple[tuple[str, ActQuantSpec | None], ...] = ()  # quantizers of linears' inputs
    kv_cache: ActQuantSpec | None = None  # quantizer of attention's keys and values
    rotation: RotationSpec | None = None  # rotations fused before quantizing (QuaRot)
    qat: QATConfig | None = None  # quantization-aware training of the rules' kernels
    mesh: str | None = None  # devices of the calibration job, "data=2,model=4" (jquant.distributed)
    # per rule: None (every layer), a tuple of layer indices or "more_bits"; () when no rule selects
    layers: tuple[tuple[int, ...] | str | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        rules = [{"pattern": p, "spec": None if s is None else s.to_dict()} for p, s in self.rules]
        for r, sel in zip(rules, self.layers):
            if sel is not None:
                r["layers"] = sel if isinstance(sel, str) else list(sel)
        d = {"name": self.name, "description": self.description, "calibration": dict(self.calibration),
             "rules": rules}
        if self.activations:
            d["activations"] = [{"pattern": p, "spec": None if s is None else s.to_dict()} for p, s in self.activations]
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        if self.rotation is not None:
            d["rotation"] = self.rotation.to_dict()
        if self.qat is not None:
            d["qat"] = self.qat.to_dict()
        if self.mesh is not None:
            d["mesh"] = self.mesh
        return d

    def for_model(self, num_layers: int) -> Recipe:
        """The recipe with every rule's ``layers`` selection written into its pattern for a
        model of ``num_layers`` decoder layers (paths ``layers/<i>/...``); unchanged when no
        rule selects layers.

        Raises:
          SpecError: a listed index outside ``[-num_layers, num_layers)``.
        """
        if not any(sel is not None for sel in self.layers):
            return self
        rules = []
        for i, ((pat, spec), sel) in enumerate(zip(self.rules, self.layers)):
            if sel is not None:
                idx = select_layers(sel, num_layers, f"recipe {self.name!r}: rule {i} ({pat!r})")
                pat = f"^(?=layers/(?:{'|'.join(map(str, idx))})/).*?(?:{pat})" if idx else "(?!)"
            rules.append((pat, spec))
        return dataclasses.replace(self, rules=tuple(rules), layers=())


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer set for the more-bits tensors of its ``_M`` mixes (``llama-quant.cpp``):
    the first and last eighth of the layers (integer division) and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def select_layers(sel: tuple[int, ...] | str, num_layers: int, where: str) -> list[int]:
    """The sorted layer indices a rule's ``layers`` selection names in a model of
    ``num_layers`` layers (see the module docstring); ``where`` names the rule in errors."""
    if sel == "more_bits":
        return [i for i in range(num_layers) if use_more_bits(i, num_layers)]
    out = set()
    for i in sel:
        if not -num_layers <= i < num_layers:
            raise SpecError(f"{where}: layer {i} does not exist in a model of {num_layers} layers "
                            f"(valid: {-num_layers} .. {num_layers - 1})")
        out.add(i % num_layers)
    return sorted(out)


LAYER_SETS = ("more_bits",)


def _layers_of(sel, where: str):
    """A rule's ``layers`` value checked: a non-empty list of integers or a named set."""
    if isinstance(sel, str):
        if sel not in LAYER_SETS:
            raise SpecError(f"{where}: layers {sel!r} is not a known layer set; valid: a list of layer indices "
                            f"or one of {', '.join(LAYER_SETS)}")
        return sel
    if not isinstance(sel, list) or not sel or not all(isinstance(i, int) and not isinstance(i, bool) for i in sel):
        raise SpecError(f"{where}: layers must be a non-empty list of layer indices or one of "
                        f"{', '.join(LAYER_SETS)}, got {short(sel)}")
    return tuple(sel)


def available() -> list[str]:
    """Names of the recipes shipped in ``configs/``."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


RECIPE_KEYS = ("name", "description", "calibration", "rules", "activations", "kv_cache", "rotation", "qat", "mesh")
RULE_KEYS = ("pattern", "spec")  # of activation rules
WEIGHT_RULE_KEYS = ("pattern", "spec", "layers")
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
            raise SpecError(f"{source}: calibration {k}={short(v)} must be {'an integer' if typ is int else 'a string'}")
        if lowest is not None and v < lowest:
            raise SpecError(f"{source}: calibration {k}={short(v)} must be >= {lowest}")
    return dict(cal)


def recipe_from_dict(d: dict[str, Any], source: str = "<dict>") -> Recipe:
    """A Recipe from its mapping; every key is checked (a misspelt one is an error, never ignored)."""
    if not isinstance(d, dict) or "rules" not in d:
        raise SpecError(f"{source}: a recipe needs a 'rules' list")
    _check_size(d, source)
    unknown = set(d) - set(RECIPE_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown recipe key(s) {sorted(unknown)}; valid: {', '.join(RECIPE_KEYS)}")
    if not isinstance(d["rules"], list):
        raise SpecError(f"{source}: 'rules' must be a list of {{pattern, spec}} entries, got {type(d['rules']).__name__}")
    rules, layers = [], []
    for i, r in enumerate(d["rules"]):
        if not isinstance(r, dict) or "pattern" not in r or "spec" not in r:
            raise SpecError(f"{source}: rule {i} needs 'pattern' and 'spec' keys, got {short(r)}")
        extra = set(r) - set(WEIGHT_RULE_KEYS)
        if extra:
            raise SpecError(f"{source}: rule {i} has unknown key(s) {sorted(extra)}; valid: {', '.join(WEIGHT_RULE_KEYS)}")
        if not isinstance(r["pattern"], str):
            raise SpecError(f"{source}: rule {i}: pattern must be a string, got {short(r['pattern'])}")
        if r["spec"] is not None and not isinstance(r["spec"], dict):
            raise SpecError(f"{source}: rule {i} ({r['pattern']!r}): spec must be a mapping or null, got {short(r['spec'])}")
        try:
            spec = None if r["spec"] is None else QuantSpec.from_dict(r["spec"])
        except SpecError as e:
            raise SpecError(f"{source}: rule {i} ({r['pattern']!r}): {e}") from e
        except TypeError as e:  # a value of the wrong type deep in a comparison
            raise SpecError(f"{source}: rule {i} ({r['pattern']!r}): {e}") from e
        rules.append((r["pattern"], spec))
        layers.append(None if r.get("layers") is None else
                      _layers_of(r["layers"], f"{source}: rule {i} ({r['pattern']!r})"))
    for key in ("name", "description", "mesh"):
        if key in d and d[key] is not None and not isinstance(d[key], str):
            raise SpecError(f"{source}: {key} must be a string, got {short(d[key])}")
    if d.get("mesh") is not None:
        from jquant.distributed import parse_mesh

        try:
            parse_mesh(d["mesh"])
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None
    if d.get("qat") is not None and any(sp is not None and sp.method == "awq" for _, sp in rules):
        raise SpecError(f"{source}: a qat section after AWQ rules is not supported (AWQ folds its scales into the "
                        "norms, which QAT would take from the unscaled float model); use method: gptq (QAT starts "
                        "from its result) or rtn")
    if d.get("qat") is not None:
        for i, (pat, sp) in enumerate(rules):
            if sp is not None and sp.method == "gptq" and sp.format == "int" and dict(sp.options).get("act_order") \
                    and not dict(sp.options).get("static_groups"):
                raise SpecError(f"{source}: rule {i} ({pat!r}): QAT trains contiguous groups, but GPTQ's act-order "
                                "without static groups gives each input its own group index (g_idx); add "
                                "static_groups: true to the options")
    return Recipe(name=d.get("name", os.path.basename(source)), description=d.get("description", ""),
                  rules=tuple(rules), calibration=check_calibration(d.get("calibration"), source),
                  activations=_activation_rules(d.get("activations"), source),
                  kv_cache=_section(ActQuantSpec, d.get("kv_cache"), f"{source}: kv_cache"),
                  rotation=_section(RotationSpec, d.get("rotation"), f"{source}: rotation"),
                  qat=_section(QATConfig, d.get("qat"), f"{source}: qat"), mesh=d.get("mesh"),
                  layers=tuple(layers) if any(x is not None for x in layers) else ())


def _section(cls, d, where: str):
    """A recipe section read by ``cls.from_dict`` (``None`` when absent), errors prefixed by ``where``."""
    if d is None:
        return None
    try:
        return cls.from_dict(d)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from e


def _activation_rules(rules, source: str) -> tuple:
    """``activations: [{pattern, spec}]``: quantizers of the linears' inputs, by kernel path."""
    if rules is None:
        return ()
    if not isinstance(rules, list):
        raise SpecError(f"{source}: 'activations' must be a list of {{pattern, spec}} entries, got {short(rules)}")
    out = []
    for i, r in enumerate(rules):
        if not isinstance(r, dict) or set(r) != set(RULE_KEYS) or not isinstance(r["pattern"], str):
            raise SpecError(f"{source}: activation rule {i} needs exactly a string 'pattern' and a 'spec', "
                            f"got {short(r)}")
        out.append((r["pattern"], _section(ActQuantSpec, r["spec"], f"{source}: activation rule {i} ({r['pattern']!r})")))
    return tuple(out)


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe from a YAML path or a name in ``configs/``."""
    path = name_or_path
    if not os.path.isfile(path):
        cand = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
        if not os.path.isfile(cand):
            raise SpecError(f"no recipe {name_or_path!r}: not a file, and not one of {', '.join(available())}")
        path = cand
    size = os.path.getsize(path)
    if size > MAX_RECIPE_BYTES:
        raise SpecError(f"{path}: a recipe of {size} bytes; at most {MAX_RECIPE_BYTES} are expected")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_RECIPE_BYTES + 1)
    try:
        d = yaml.load(raw.decode("utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: a recipe must be UTF-8 text ({e})") from e
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:
        # ValueError: e.g. an impossible timestamp; RecursionError: thousands of nested brackets
        raise SpecError(f"{path}: invalid YAML: {type(e).__name__}: {short(str(e))}") from e
    return recipe_from_dict(d, path)


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, but ``5e-5`` and ``1E6`` are numbers (YAML 1.1 wants a dot in a
    float, so PyYAML reads them as strings; YAML 1.2 and JSON do not)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                             |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                             |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                             |[-+]?\.(?:inf|Inf|INF)
                             |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))

MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000


def _check_size(d, source: str) -> None:
    """Refuse a document that expands to too many values: YAML aliases can make a 1 KB file a
    billion-element (or self-referential) tree, which any later walk or message would expand."""
    n, stack = 0, [d]
    while stack:
        o = stack.pop()
        n += 1
        if n > MAX_RECIPE_VALUES:
            raise SpecError(f"{source}: the recipe expands to more than {MAX_RECIPE_VALUES} values "
                            "(nested YAML aliases?); a recipe is a short list of rules")
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
