"""Block sizes per shape: a small tuning table, and the autotune helper that writes it.

The table (``tuning.json`` beside this file, or the file named by ``$JQUANT_TUNING``) maps
``device kind → kernel → list of entries``; an entry gives the block sizes for activations
with at most ``max_m`` rows (``null``: any) and, optionally, a particular ``(N, K, bits)``.
:func:`lookup` takes the first entry that fits; with no table entry for the device it uses
:data:`DEFAULTS`, chosen by the regime: small M is bandwidth-bound (narrow M tile, long K
tiles, many programs along N), large M is compute-bound (square-ish tiles).

:func:`autotune` times candidate configs of a kernel on the current device and writes the
fastest per ``(kernel, M bucket, N, K, bits)`` into the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Iterable

import jax

from jquant._atomic import write_json
from jquant._timing import device_time

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuning.json")


@dataclasses.dataclass(frozen=True)
class Config:
    bm: int = 16
    bn: int = 128
    bk: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs sharing one output tile's K range (float32 partials, summed after)

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two ≥ 16 (Triton tile sizes)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be at least 1")


# (max_m, config): the first entry whose max_m ≥ M.
DEFAULTS: dict[str, list[tuple[int | None, Config]]] = {
    "wq": [(16, Config(16, 64, 256, 4, 4, split_k=4)), (64, Config(64, 64, 128, 4, 3)),
           (256, Config(64, 128, 64, 4, 3)), (None, Config(128, 128, 64, 8, 3))],
    "int": [(16, Config(16, 64, 256, 4, 4)), (64, Config(64, 64, 128, 4, 3)),
            (None, Config(128, 128, 64, 8, 3))],
}


def device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except Exception:  # pragma: no cover - no backend at all
        return "unknown"


def _table_path() -> str:
    return os.environ.get("JQUANT_TUNING", TABLE_PATH)


def load_table(path: str | None = None) -> dict:
    path = path or _table_path()
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def lookup(kernel: str, M: int, N: int, K: int, bits: int, *, device: str | None = None,
           table: dict | None = None) -> Config:
    """Block sizes for a kernel call: the tuning table's entry for this device, else the defaults."""
    table = load_table() if table is None else table
    for e in table.get(device or device_kind(), {}).get(kernel, []):
        if e.get("max_m") is not None and M > e["max_m"]:
            continue
        if any(e.get(k) is not None and e[k] != v for k, v in (("N", N), ("K", K), ("bits", bits))):
            continue
        return Config(**e["config"])
    for max_m, cfg in DEFAULTS[kernel]:
        if max_m is None or M <= max_m:
            return cfg
    raise AssertionError("DEFAULTS must end with a catch-all entry")


def candidates(M: int) -> list[Config]:
    """A modest search space around the regime of M."""
    bms = (16,) if M <= 16 else (32, 64) if M <= 64 else (64, 128)
    out = []
    splits = (1, 2, 4, 8) if M <= 16 else (1,)
    for bm, bn, bk, nw, ns, sk in itertools.product(bms, (32, 64, 128, 256), (64, 128, 256), (4, 8), (2, 3, 4),
                                                    splits):
        if bm * bn >= 128 * 256 and nw == 4:
            continue
        out.append(Config(bm, bn, bk, nw, ns, sk))
    return out


def autotune(kernel: str, make_call: Callable[[Config], Callable[[], object]], *, M: int, N: int, K: int,
             bits: int, configs: Iterable[Config] | None = None, reps: int = 10, path: str | None = None,
             max_m: int | None = None, write: bool = True) -> tuple[Config, list[tuple[Config, float]]]:
    """Time ``make_call(config)()`` for each candidate, keep the fastest, and record it.

    Args:
      kernel: the table key (``"wq"`` or ``"int"``).
      make_call: builds a zero-argument function running the kernel with a config (inputs
        already on the device).
      M, N, K, bits: the shape the entry is for; ``max_m`` (default ``M``) is the bucket bound.
      configs: candidates (default :func:`candidates`); ones that fail to compile are skipped.
      path: the table to update (default the package's ``tuning.json`` or ``$JQUANT_TUNING``).
    Returns:
      ``(best config, [(config, seconds), ...])``.
    """
    results = []
    for cfg in (configs if configs is not None else candidates(M)):
        try:
            results.append((cfg, device_time(make_call(cfg), reps)))
        except Exception:  # a config that does not compile (shared memory, registers) is skipped
            continue
    if not results:
        raise RuntimeError(f"autotune {kernel}: no candidate config ran for M={M} N={N} K={K} bits={bits}")
    best = min(results, key=lambda r: r[1])[0]
    if write:
        path = path or _table_path()
        table = load_table(path)
        entries = table.setdefault(device_kind(), {}).setdefault(kernel, [])
        key = {"max_m": max_m if max_m is not None else M, "N": N, "K": K, "bits": bits}
        entries[:] = [e for e in entries if {k: e.get(k) for k in key} != key]
        entries.append({**key, "config": dataclasses.asdict(best)})
        # By M bucket; inside one, entries for a particular shape before general ones.
        entries.sort(key=lambda e: (e.get("max_m") is None, e.get("max_m") or 0,
                                    sum(e.get(k) is None for k in ("N", "K", "bits"))))
        write_json(path, table)
    return best, results
