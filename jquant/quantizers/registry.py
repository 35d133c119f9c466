"""The one method interface: what a quantization method declares, and the registry.

A method is a :class:`Method`: a name, the statistics of a linear's input it needs
(``()`` for data-free methods; see :mod:`jquant.quantizers.stats`), a frozen dataclass of
its options (validated when a ``QuantSpec`` naming the method is built), the formats it
accepts, and a function

    quantize(w, spec, stats, *, path) -> (QTensor, info)

that turns a weight (Flax layout ``(in, out)``, groups along ``spec.axis``) and a
``{statistic name: array}`` mapping into a QTensor, with a dict of numbers worth logging
(``loss``, ``damp``, ...). Everything that walks trees, collects statistics or runs
calibration (``quantize_tree``, ``calibrate.quantize_model``, the CLI) dispatches through
:func:`quantize_weight`; adding a method is one module that calls :func:`register`, plus
its import in ``jquant/quantizers/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

from jquant.errors import SpecError, at
from jquant.formats import FORMATS
from jquant.quantizers.stats import check_names


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered quantization method (see the module docstring).

    Attributes:
      name: what ``QuantSpec.method`` says.
      quantize: ``(w, spec, stats, *, path) -> (QTensor, info dict)``.
      stats: names of the input statistics it needs (empty for data-free methods), or a
        function ``spec -> names`` when they depend on the options (e.g. an optional
        importance matrix); read it through :meth:`stats_for`.
      options: a frozen dataclass of the method's options (fields with defaults, bool/int/
        float/str types), or None when it takes none. An optional ``validate(self)`` method
        raises :class:`jquant.errors.SpecError` for out-of-range values.
      formats: the ``QuantSpec.format`` values it accepts.
      paper: where the method comes from (arXiv id).
      check: optional ``check(spec)`` raising SpecError for specs the method cannot serve
        (called when a QuantSpec is built, so a bad recipe fails before any work).
      prepare: optional block-level transform the calibration pipeline runs on a decoder
        block's float parameters before any of its linears is quantized (AWQ folds its
        scales here): ``prepare(bstate, structure, specs, collect, replace, leaf, *, prefix)
        -> (bstate, info)``; see :func:`jquant.quantizers.awq.prepare_block`.
      shards: ``quantize`` takes a ``mesh=`` keyword and splits its solve over the mesh's
        devices (the calibration pipeline passes the job's mesh).
    """

    name: str
    quantize: Callable[..., tuple[Any, dict]]
    stats: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    options: type | None = None
    formats: tuple[str, ...] = FORMATS
    paper: str = ""
    summary: str = ""
    check: Callable[[Any], None] | None = None
    prepare: Callable[..., tuple[Any, dict]] | None = None
    shards: bool = False

    def stats_for(self, spec) -> tuple[str, ...]:
        """The statistics this method needs to quantize with ``spec``."""
        return tuple(self.stats(spec)) if callable(self.stats) else tuple(self.stats)

    def parse_options(self, options: Mapping[str, Any] | tuple = ()) -> Any:
        """The options dataclass from a mapping (or the sorted pairs a QuantSpec stores).

        Raises SpecError for unknown keys, values of the wrong type (``damp: "0.1"``) and
        whatever the options' ``validate`` refuses.
        """
        opts = dict(options)
        if self.options is None:
            if opts:
                raise SpecError(f"method {self.name!r} takes no options, got {sorted(opts)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = set(opts) - set(fields)
        if unknown:
            raise SpecError(f"unknown {self.name} option(s) {sorted(unknown)}; valid: {sorted(fields)}")
        hints = typing.get_type_hints(self.options)
        for k, v in opts.items():
            want = hints.get(k)
            args = typing.get_args(want)
            if type(None) in args:  # ``X | None``: None is fine, anything else must be an X
                if v is None:
                    continue
                want = next(a for a in args if a is not type(None))
            if want is bool:
                ok = isinstance(v, bool)
            elif want is int:
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif want is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if ok:
                    opts[k] = float(v)
                    if not math.isfinite(opts[k]):
                        raise SpecError(f"{self.name} option {k}={v!r} must be a finite number")
            elif want is str:
                ok = isinstance(v, str)
            else:
                ok = True
            if not ok:
                raise SpecError(f"{self.name} option {k}={v!r} must be of type {want.__name__}, "
                                f"got {type(v).__name__}")
        o = self.options(**opts)
        if hasattr(o, "validate"):
            o.validate()
        return o


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new). Returns it."""
    if not isinstance(method, Method):
        raise SpecError(f"register() takes a Method, got {type(method).__name__}")
    if method.name in _REGISTRY:
        raise SpecError(f"a method named {method.name!r} is already registered")
    if not callable(method.stats):
        check_names(method.stats, f"method {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def available() -> tuple[str, ...]:
    """Names of the registered methods."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``, or a SpecError listing the available ones."""
    m = _REGISTRY.get(name)
    if m is None:
        raise SpecError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")
    return m


def options_of(spec) -> Any:
    """The options dataclass of ``spec``'s method, read from ``spec.options`` (validated;
    SpecError as :meth:`Method.parse_options`)."""
    return get(spec.method).parse_options(spec.options)


def check_spec(spec) -> None:
    """Validate a QuantSpec against its method (format accepted, options well-formed)."""
    m = get(spec.method)
    if spec.format not in m.formats:
        raise SpecError(f"method {m.name!r} does not take format {spec.format!r}; it takes: {', '.join(m.formats)}")
    m.parse_options(spec.options)
    if m.check is not None:
        m.check(spec)
    check_names(m.stats_for(spec), f"method {m.name!r}")


def needs_data(spec) -> bool:
    """Whether the method of ``spec`` (a QuantSpec or None) needs calibration statistics."""
    return spec is not None and bool(get(spec.method).stats_for(spec))


def quantize_weight(w, spec, stats: Mapping[str, Any] | None = None, *, path: str | None = None,
                    prepared: bool = False, mesh=None):
    """Quantize one weight with the method ``spec.method`` names. Returns ``(QTensor, info)``.

    Args:
      w: float array; a Flax kernel is ``(in, out)``, groups run along ``spec.axis``.
      spec: the QuantSpec.
      stats: the input statistics the method needs (``{name: array}``, see
        :mod:`jquant.quantizers.stats`); ignored by data-free methods.
      path: tree path named in errors.
      prepared: the calibration pipeline says the method's block-level ``prepare`` has run
        on this weight's block (AWQ's scales are folded); such methods are refused otherwise.
      mesh: a ``jax.sharding.Mesh``; methods that split their solve over devices
        (:attr:`Method.shards`: GPTQ's output columns) use it, the others ignore it.

    Raises:
      SpecError: when the method needs statistics that ``stats`` does not hold, or a block
        transform that has not run.
      ShapeError: an empty array.
    """
    from jquant.errors import ShapeError

    m = get(spec.method)
    if m.prepare is not None and not prepared:
        raise SpecError(at(path, f"method {m.name!r} transforms a whole decoder block (it folds scales into the "
                                 "operation before each linear); run it through jquant.calibrate.quantize_model"))
    shape = tuple(getattr(w, "shape", ()))
    if shape and min(shape) == 0:
        raise ShapeError(at(path, f"cannot quantize an empty array of shape {shape}"))
    stats = {} if stats is None else stats
    names = m.stats_for(spec)
    missing = [n for n in names if n not in stats]
    if missing:
        raise SpecError(at(path, f"method {m.name!r} needs the input statistic(s) {missing} of this layer, "
                                 "which were not given: run it through jquant.calibrate.quantize_model, or pass "
                                 "stats={path: {name: array}} (see jquant.quantizers.stats.collect)"))
    kw = {"mesh": mesh} if m.shards and mesh is not None else {}
    qt, info = m.quantize(w, spec, {n: stats[n] for n in names}, path=path, **kw)
    check_stored(qt, w, path)
    return qt, info


def check_stored(qt, w, path: str | None = None) -> None:
    """Refuse a QTensor whose stored scales or zeros did not keep their value (checked when
    concrete): a scale or float minimum that overflowed its storage dtype (stored as ±inf, so
    its group would dequantize to inf/NaN), or a scale that underflowed to 0 for a group that
    is not all zeros (the group would dequantize to zeros). Raises NonFiniteError naming the
    leaf and the remedy (a wider ``scale_dtype``)."""
    import jax
    import jax.numpy as jnp

    from jquant.errors import NonFiniteError

    from jquant import formats

    if isinstance(qt.codes, jax.core.Tracer) or isinstance(qt.scale, jax.core.Tracer):
        return
    if qt.outlier_idx is not None:  # the quantized part was made from w with the kept rows zeroed
        w = jnp.asarray(w).at[qt.outlier_idx].set(0)
    if qt.grid.fmt in formats.GGML_FORMATS + formats.BLOCKFLOAT_FORMATS:
        _check_block_format(qt, w, path)
        return
    if qt.scale is None:
        return
    for name, arr in (("scale", qt.scale), ("zero", qt.zero)):
        if arr is None or not jnp.issubdtype(arr.dtype, jnp.floating):
            continue
        finite = jnp.isfinite(arr)
        if not bool(jnp.all(finite)):
            n_bad = int(arr.size - jnp.sum(finite))
            big = float(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32))))
            raise NonFiniteError(at(path, f"{n_bad} stored {name}(s) overflow {arr.dtype} (largest finite "
                                          f"{float(jnp.finfo(arr.dtype).max):.6g}); the weight's largest |w| is "
                                          f"{big:.6g}; use scale_dtype='float32' in the QuantSpec"))
    zeros = qt.scale == 0
    if qt.grid.fmt == "bcq":  # one α per bit plane: a group is lost only when all its α's are 0
        zeros = jnp.all(zeros, axis=0)
    if bool(jnp.any(zeros)):
        lay = qt.layout
        wf = jnp.asarray(w, jnp.float32)
        absmax = jnp.max(jnp.where(jnp.isnan(g := lay.to_groups(jnp.abs(wf))), 0.0, g), axis=1)  # (G, R)
        stored0 = lay.params_from_stored(zeros)[:, 0, :] if qt.g_idx is None else None
        if stored0 is not None and bool(jnp.any(stored0 & (absmax > 0))):
            n_bad = int(jnp.sum(stored0 & (absmax > 0)))
            tiny = float(jnp.max(jnp.where(stored0, absmax, 0.0)))
            raise NonFiniteError(at(path, f"{n_bad} group scale(s) underflow to 0 in {qt.scale.dtype} although "
                                          f"the group holds weights up to |w| = {tiny:.3g}; they would dequantize "
                                          "to zeros; use scale_dtype='float32' in the QuantSpec"))



def _check_block_format(qt, w, path):
    """Formats whose scales live inside their blocks (GGUF, MX, NVFP4): the dequantized blocks
    must be finite, and a block of nonzero weights must not come back all zeros."""
    import jax.numpy as jnp

    from jquant.errors import NonFiniteError

    deq = qt.dequantize(jnp.float32)
    wf = jnp.asarray(w, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(deq))):
        n_bad = int(jnp.sum(~jnp.isfinite(deq)))
        raise NonFiniteError(at(path, f"{qt.grid.fmt} cannot hold this weight: {n_bad} value(s) dequantize to "
                                      f"NaN/Inf (largest |w| {float(jnp.max(jnp.abs(wf))):.6g} overflows the "
                                      "format's block scales); use an int format with scale_dtype='float32'"))
    K = wf.shape[0]
    QK = qt.group_size
    if K % QK == 0:
        lost = jnp.all(deq.reshape(K // QK, QK, -1) == 0, axis=1) & jnp.any(wf.reshape(K // QK, QK, -1) != 0, axis=1)
        if bool(jnp.any(lost)):
            tiny = float(jnp.max(jnp.where(lost[:, None, :], jnp.abs(wf.reshape(K // QK, QK, -1)), 0.0)))
            raise NonFiniteError(at(path, f"{int(jnp.sum(lost))} block(s) of nonzero weights (|w| up to {tiny:.3g}) "
                                          f"dequantize to all zeros in {qt.grid.fmt}: their block scales underflow; "
                                          "use an int format with scale_dtype='float32'"))
