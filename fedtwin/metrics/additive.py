"""The algebra every statistics class shares: add, zero, flatten to a vector, rebuild.

A statistics class is a dataclass whose fields are float64 numpy arrays (sums over patients),
nested statistics, or tuples of statistics, plus fields marked ``static`` (the layout) that
are not summed but must be equal. Because every array field is a plain sum over patients, the
statistics of two disjoint patient sets are the element-wise sum of their statistics, and the
same holds for the flat vectors: ``(a + b).to_vector() == a.to_vector() + b.to_vector()``.
That is what lets SecAgg+ add site vectors without ever seeing one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from fedtwin.metrics.layout import MetricsLayoutError

STATIC: dict[str, bool] = {"static": True}

S = TypeVar("S", bound="AdditiveStats")


def static_field() -> Any:
    """A dataclass field that is carried along (and checked equal) but never summed."""
    return field(metadata=STATIC)


@dataclass(frozen=True)
class Segment:
    """Where one statistic array sits in the flat vector."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class AdditiveStats:
    """Mixin for dataclasses of additive sufficient statistics (see the module docstring)."""

    # -- traversal ----------------------------------------------------------------------------

    def _tuple_labels(self, name: str, n: int) -> list[str]:
        """Labels for the items of a tuple field in segment names; subclasses may name them."""
        return [str(i) for i in range(n)]

    def _map(self: S, fn: Callable[[np.ndarray], np.ndarray]) -> S:
        kwargs: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.metadata.get("static"):
                kwargs[f.name] = v
            elif isinstance(v, AdditiveStats):
                kwargs[f.name] = v._map(fn)
            elif isinstance(v, tuple):
                kwargs[f.name] = tuple(x._map(fn) for x in v)
            else:
                kwargs[f.name] = fn(v)
        return type(self)(**kwargs)

    def _arrays(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for f in fields(self):  # type: ignore[arg-type]
            if f.metadata.get("static"):
                continue
            v = getattr(self, f.name)
            name = f"{prefix}{f.name}"
            if isinstance(v, AdditiveStats):
                yield from v._arrays(name + ".")
            elif isinstance(v, tuple):
                for label, x in zip(self._tuple_labels(f.name, len(v)), v):
                    yield from x._arrays(f"{name}[{label}].")
            else:
                yield name, v

    # -- algebra ------------------------------------------------------------------------------

    def __add__(self: S, other: Any) -> S:
        if type(other) is not type(self):
            return NotImplemented
        kwargs: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.metadata.get("static"):
                if a != b:
                    if hasattr(a, "check_same"):
                        a.check_same(b)
                    raise MetricsLayoutError(f"cannot add {type(self).__name__}: field {f.name!r} differs")
                kwargs[f.name] = a
            elif isinstance(a, AdditiveStats):
                kwargs[f.name] = a + b
            elif isinstance(a, tuple):
                if len(a) != len(b):
                    raise MetricsLayoutError(f"cannot add {type(self).__name__}: {f.name!r} lengths differ")
                kwargs[f.name] = tuple(x + y for x, y in zip(a, b))
            else:
                if a.shape != b.shape:
                    raise MetricsLayoutError(
                        f"cannot add {type(self).__name__}.{f.name}: shapes {a.shape} and {b.shape} differ"
                    )
                kwargs[f.name] = np.asarray(a + b, dtype=np.float64)  # 0-d stays an array
        return type(self)(**kwargs)

    def __radd__(self: S, other: Any) -> S:
        # lets ``sum(list_of_stats)`` start from the integer 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def zeros_like(self: S) -> S:
        """The same layout with every statistic zero: the identity of ``+``."""
        return self._map(np.zeros_like)

    # -- flat vectors ---------------------------------------------------------------------------

    def to_vector(self) -> np.ndarray:
        """All statistics flattened (C order, field order) into one float64 vector."""
        parts = [np.asarray(a, dtype=np.float64).ravel() for _, a in self._arrays()]
        return np.concatenate(parts) if parts else np.zeros(0)

    @classmethod
    def from_vector(cls: type[S], template: S, vec: np.ndarray) -> S:
        """Rebuild statistics from a vector laid out like ``template`` (e.g. a summed vector)."""
        if not isinstance(template, cls):
            raise TypeError(f"template must be a {cls.__name__}, got {type(template).__name__}")
        vec = np.asarray(vec, dtype=np.float64)
        expected = template.vector_size()
        if vec.ndim != 1 or vec.size != expected:
            raise MetricsLayoutError(
                f"vector has shape {vec.shape}, the layout needs ({expected},)",
                "build the template from the same layout the vector was made with",
            )
        if not np.all(np.isfinite(vec)):
            raise MetricsLayoutError("statistics vector contains NaN or infinity")
        pos = 0

        def take(a: np.ndarray) -> np.ndarray:
            nonlocal pos
            size = a.size
            out = vec[pos : pos + size].reshape(a.shape).copy()
            pos += size
            return out

        return template._map(take)

    def vector_size(self) -> int:
        return int(sum(a.size for _, a in self._arrays()))

    def segments(self) -> list[Segment]:
        """Name, offset and shape of every statistic array in the vector (for docs and debugging)."""
        out: list[Segment] = []
        pos = 0
        for name, a in self._arrays():
            out.append(Segment(name, pos, tuple(a.shape)))
            pos += a.size
        return out
