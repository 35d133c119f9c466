"""Quantize a whole parameter tree by rules, and summarise what it holds.

Works on Flax NNX ``State``, linen ``params`` dicts and plain nested dicts/lists alike:
leaves are addressed by their key path (see :func:`jquant.spec.path_str`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from jquant.errors import RuleWarning
from jquant.qtensor import QTensor, is_qtensor
from jquant.quantizers import quantize_weight
from jquant.spec import Rule, compile_rules, match, path_str


def quantize_tree(params, rules: Sequence[Rule], *, stats: Mapping[str, Mapping] | None = None,
                  progress: Callable | None = None):
    """Quantize the leaves of ``params`` that ``rules`` assign a spec to.

    Args:
      params: a pytree of float arrays (NNX State, linen dict, nested dicts). QTensor leaves
        already in it are left as they are.
      rules: ordered ``(pattern, QuantSpec | None)``; first ``re.search`` match wins. Each
        spec's ``method`` (see :mod:`jquant.quantizers`) quantizes its leaves.
      stats: for data-driven methods (GPTQ, ...): ``{leaf path: {statistic: array}}``, the
        statistics of each leaf's input (:func:`jquant.quantizers.collect`). The calibration
        pipeline (:func:`jquant.calibrate.quantize_model`) collects them itself.
      progress: optional callable ``(path, spec)`` called before each leaf is quantized.

    Returns:
      a tree of the same structure with QTensor leaves where a spec applied.
      A rule that matched no leaf raises a :class:`jquant.errors.RuleWarning`.

    Raises:
      SpecError: a data-driven method on a leaf ``stats`` has nothing for.
    """
    compiled = compile_rules(rules)
    used = [False] * len(compiled)

    def one(keypath, leaf):
        if is_qtensor(leaf):
            return leaf
        path = path_str(keypath)
        i, spec = match(path, compiled)
        if i >= 0:
            used[i] = True
        if spec is None:
            return leaf
        if progress is not None:
            progress(path, spec)
        return quantize_weight(leaf, spec, None if stats is None else stats.get(path), path=path)[0]

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=is_qtensor)
    for (pat, _), u in zip(compiled, used):
        if not u:
            warnings.warn(f"quantization rule {pat.pattern!r} matched no leaf of the tree", RuleWarning, stacklevel=2)
    return out


@dataclasses.dataclass
class LeafSummary:
    path: str
    shape: tuple
    kind: str  # spec description or the float dtype
    nbytes: int
    numel: int
    quantized: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)


@dataclasses.dataclass
class TreeSummary:
    """Per-leaf and total sizes of a (partly) quantized tree."""

    leaves: list[LeafSummary]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.leaves)

    @property
    def numel(self) -> int:
        return sum(x.numel for x in self.leaves)

    @property
    def quantized(self) -> list[LeafSummary]:
        return [x for x in self.leaves if x.quantized]

    @property
    def bits_per_weight(self) -> float:
        """Over every parameter, float ones included."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    @property
    def quantized_bits_per_weight(self) -> float:
        q = self.quantized
        return 8.0 * sum(x.nbytes for x in q) / max(sum(x.numel for x in q), 1)

    def table(self, max_rows: int | None = 40) -> str:
        rows = self.leaves if max_rows is None or len(self.leaves) <= max_rows else self.leaves[:max_rows]
        w = max([len(r.path) for r in rows] + [4])
        lines = [f"{'path':<{w}}  {'shape':<16} {'kind':<24} {'bytes':>12} {'bits/w':>7}"]
        for r in rows:
            lines.append(f"{r.path:<{w}}  {str(r.shape):<16} {r.kind:<24} {r.nbytes:>12,} {r.bits_per_weight:>7.3f}")
        if len(rows) < len(self.leaves):
            lines.append(f"... {len(self.leaves) - len(rows)} more leaves")
        lines.append(f"{'total':<{w}}  {'':<16} {f'{len(self.quantized)}/{len(self.leaves)} quantized':<24} "
                     f"{self.nbytes:>12,} {self.bits_per_weight:>7.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _describe(q: QTensor) -> str:
    g = q.grid
    name = f"{g.fmt}{g.bits}" if g.fmt in ("int", "bcq") else g.fmt
    gran = f"g{q.group_size}" if q.granularity == "group" else q.granularity
    extra = "" if g.fmt != "int" else (" sym" if g.symmetric else (" asym" if g.zero_type == "int" else " asym-fmin"))
    return f"{q.method} {name} {gran}{extra}" if q.method != "rtn" else f"{name} {gran}{extra}"


def summary(tree) -> TreeSummary:
    """Sizes and bits/weight of every leaf (QTensor: codes + scales + zeros + g_idx)."""
    leaves = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]:
        path = path_str(keypath)
        if is_qtensor(leaf):
            leaves.append(LeafSummary(path, leaf.shape, _describe(leaf), leaf.nbytes, leaf.size, quantized=True))
        elif hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            n = int(np.prod(leaf.shape))
            leaves.append(LeafSummary(path, tuple(leaf.shape), str(leaf.dtype), n * leaf.dtype.itemsize, n))
    return TreeSummary(leaves)
