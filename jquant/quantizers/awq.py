"""AWQ: activation-aware weight quantization (Lin et al., arXiv:2306.00978).

Weights that meet large activations matter most. AWQ scales each input channel ``j`` of
the linears that share one input by ``s_j`` (their Flax kernels ``(in, out)`` get row ``j``
multiplied by ``s_j``) and divides the operation that produces the input by ``s_j`` (the
RMSNorm weight before q/k/v and before gate/up; the output columns of ``up_proj`` before
``down_proj``; of ``v_proj`` before ``o_proj`` when no grouped-query attention makes their
shapes differ, as AutoAWQ does), so the float model computes exactly the same function,
and then quantizes the scaled weights. The scales come from a grid search per group:

    s(α) = ā^α / sqrt(max(ā^α)·min(ā^α)),   α ∈ {0, 1/n, …, (n−1)/n}

with ``ā_j`` the mean ``|x_j|`` of the group's calibration input (statistic ``act_abs_mean``),
choosing the α whose RTN-quantized weights give the least output error on the calibration
inputs, ``Σ_linears tr(ΔWᵀ H ΔW)`` with ``ΔW = W − Q(W·s)/s`` and ``H = 2XᵀX/n``
(statistic ``hessian``); α = 0 is plain RTN, so the search never does worse than RTN on
the calibration inputs. AutoAWQ measures the error on the output of the whole attention or
MLP module; jquant measures it on the outputs of the group's linears, which the Hessian
gives without keeping activations.

Then ``then`` quantizes the scaled weights: ``rtn`` (AWQ as published) or ``gptq`` (AWQ+GPTQ:
GPTQ on the scaled weights, with the Hessian of the scaled inputs, collected after the
scales are folded). The search and the folding run on the float block before any of its
linears is quantized (:func:`prepare_block`, called by the calibration pipeline).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jquant.errors import SpecError, at
from jquant.quantizers.registry import Method, get, options_of, register
from jquant.quantizers.rtn import fake_quant
from jquant.spec import QuantSpec

_HP = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AWQOptions:
    """AWQ options (``QuantSpec.options``): ``grid`` (number of α values, ≥ 2), ``then``
    (``rtn`` or ``gptq``: the quantizer of the scaled weights); with ``then='gptq'`` the GPTQ
    options ``damp``, ``block_size``, ``act_order``, ``static_groups``, ``max_damp_tries``."""

    grid: int = 20
    then: str = "rtn"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    max_damp_tries: int = 6

    def validate(self) -> None:
        if self.grid < 2:
            raise SpecError(f"AWQ grid must be >= 2 (α = 0 and at least one scaled candidate), got {self.grid}")
        if self.then not in ("rtn", "gptq"):
            raise SpecError(f"AWQ then must be 'rtn' or 'gptq', got {self.then!r}")
        if self.then == "gptq":
            get("gptq").parse_options(self._gptq_options())
        else:
            defaults = AWQOptions(grid=self.grid, then=self.then)
            ignored = [k for k in self._gptq_options() if getattr(self, k) != getattr(defaults, k)]
            if ignored:
                raise SpecError(f"AWQ options {ignored} are GPTQ's and apply only with then='gptq' (then={self.then!r})")

    def _gptq_options(self) -> dict:
        return {"damp": self.damp, "block_size": self.block_size, "act_order": self.act_order,
                "static_groups": self.static_groups, "max_damp_tries": self.max_damp_tries}




def inner_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of the quantizer that runs on the scaled weights."""
    o = options_of(spec)
    return dataclasses.replace(spec, method=o.then, options=o._gptq_options() if o.then == "gptq" else ())


def candidate_scales(act_abs_mean, alphas):
    """``(len(alphas), in)`` scales ``ā^α / sqrt(max·min)`` (ā floored at 1e-4, as AutoAWQ)."""
    a = jnp.maximum(act_abs_mean.astype(jnp.float32), 1e-4)
    s = a[None, :] ** jnp.asarray(alphas, jnp.float32)[:, None]
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(jnp.max(s, axis=1, keepdims=True) * jnp.min(s, axis=1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("spec",))
def search_scales(kernels: tuple, H, act_abs_mean, *, spec: QuantSpec):
    """The grid search of one group: returns ``(s, losses)``: the best scales ``(in,)`` and
    the output error ``Σ tr(ΔWᵀ H ΔW)`` of every α ``(grid,)`` (``losses[0]`` is plain RTN's).

    ``kernels``: the group's Flax kernels ``(in, out_l)``; ``H``: ``(in, in)``; ``spec``: the
    RTN grid the search quantizes with.
    """
    n = options_of(spec).grid
    rspec = dataclasses.replace(spec, method="rtn", options=())
    cands = candidate_scales(act_abs_mean, [i / n for i in range(n)])
    H = H.astype(jnp.float32)

    def loss(s):
        total = jnp.float32(0)
        for w in kernels:
            w = w.astype(jnp.float32)
            d = w - fake_quant(w * s[:, None], rspec).astype(jnp.float32) / s[:, None]
            total = total + jnp.sum(d * jnp.dot(H, d, precision=_HP))
        return total

    losses = lax.map(loss, cands)
    return cands[jnp.argmin(losses)], losses


def _check(spec: QuantSpec, path: str | None = None) -> None:
    o = options_of(spec)
    if spec.axis != 0:
        raise SpecError(at(path, f"AWQ scales the input rows of a Flax kernel (in, out): axis must be 0, got {spec.axis}"))
    del o
    inner_spec(spec)  # the spec of the quantizer that follows must be valid too (raises SpecError)


def _stats(spec: QuantSpec) -> tuple[str, ...]:
    """The search's statistics, and those of the quantizer that follows."""
    return tuple(sorted({"act_abs_mean", "hessian", *get(options_of(spec).then).stats_for(inner_spec(spec))}))


def _quantize(w, spec: QuantSpec, stats, *, path: str | None = None):
    inner = inner_spec(spec)
    qt, info = get(inner.method).quantize(w, inner, stats, path=path)
    return dataclasses.replace(qt, method="awq"), info


def prepare_block(bstate, structure, specs: dict, collect, replace, leaf, *, prefix: str = ""):
    """Search and fold AWQ's scales into one block's float parameters, group by group.

    Args:
      bstate: the block's parameter state (float).
      structure: ``((linear names), fold target)`` per input group, in true-sequential order;
        the fold target is ``("scale", path)`` (a norm weight, divided by s), ``("scale+1", path)``
        (a norm weighing by ``1 + w``: ``1 + w`` divided by s), ``("columns",
        path)`` (a kernel whose output columns, and bias, are divided by s) or None (cannot fold).
      specs: ``{linear name: QuantSpec}`` of the block's linears that rules quantize.
      collect: ``(bstate, linear name, statistic names) -> {name: array}`` over the calibration set.
      replace, leaf: the pipeline's leaf setter ``(state, {path: value})`` and getter ``(state, path)``.

    Returns ``(bstate, info)``: the state with scales folded (the float function unchanged)
    and ``{group leader: {"alpha": α, "loss": …, "loss_rtn": …} or "skipped: why"}``.
    """
    info = {}
    for names, fold in structure:
        awq = {n: specs[n] for n in names if n in specs and specs[n].method == "awq"}
        if not awq:
            continue
        leader = names[0]
        if fold is None:
            info[leader] = "skipped: no operation before this group to fold the scales into"
            continue
        kind, target = fold
        if kind == "columns":
            kout = leaf(bstate, target).shape[1]
            kin = leaf(bstate, f"{leader}/kernel").shape[0]
            if kout != kin:
                info[leader] = (f"skipped: {target} has {kout} outputs, {leader} {kin} inputs (grouped-query "
                                "attention); not scaled, as AutoAWQ")
                continue
        first = next(iter(awq.values()))
        if any(s.bits != first.bits or s.group_size != first.group_size or s.granularity != first.granularity
               or s.symmetric != first.symmetric or s.zero_type != first.zero_type for s in awq.values()):
            raise SpecError(at(f"{prefix}{leader}", "AWQ linears that share an input share one scale search: give "
                                                    "them the same bits, group size, granularity and zero type"))
        st = collect(bstate, leader, ("act_abs_mean", "hessian"))
        kernels = tuple(leaf(bstate, f"{n}/kernel") for n in awq)
        s, losses = search_scales(kernels, st["hessian"], st["act_abs_mean"], spec=first)
        best = int(jnp.argmin(losses))
        info[leader] = {"alpha": best / options_of(first).grid, "loss": float(losses[best]), "loss_rtn": float(losses[0])}
        bstate = fold_scales(bstate, names, fold, s, replace, leaf)
    return bstate, info


def fold_scales(bstate, names, fold, s, replace, leaf):
    """Multiply row j of each kernel in ``names`` by ``s_j`` and divide the fold target by it."""
    kind, target = fold
    new = {}
    for n in names:
        w = leaf(bstate, f"{n}/kernel")
        new[f"{n}/kernel"] = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)
    t = leaf(bstate, target)
    if kind == "scale":
        new[target] = (t.astype(jnp.float32) / s).astype(t.dtype)
    elif kind == "scale+1":  # a norm weighing by 1 + w (Gemma): (1 + w') = (1 + w) / s
        new[target] = ((1.0 + t.astype(jnp.float32)) / s - 1.0).astype(t.dtype)
    else:
        new[target] = (t.astype(jnp.float32) / s[None, :]).astype(t.dtype)
        bias = target[: -len("kernel")] + "bias"
        try:
            b = leaf(bstate, bias)
            new[bias] = (b.astype(jnp.float32) / s).astype(b.dtype)
        except KeyError:
            pass
    return replace(bstate, new)


register(Method("awq", _quantize, stats=_stats, options=AWQOptions, formats=("int",), check=_check,
                prepare=prepare_block,
                paper="arXiv:2306.00978",
                summary="per-input-channel scales from activation magnitudes, grid-searched on the output error "
                        "and folded into the preceding norm/linear; then RTN or GPTQ"))
