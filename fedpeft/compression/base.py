"""The codec interface, the codec registry and the spec grammar ``name[:positional][,key=value]*``.

Each codec is a :class:`Codec` subclass with a small parameter dataclass (``Params``) whose fields
carry their allowed choices / ranges (:func:`fedpeft.fields.option`, checked like config keys);
``make_codec("compeft:0.05,scale=std")`` parses and validates a spec against it. Adding a codec = one
module with a ``@register_codec("name")`` class.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedpeft.compression.payload import H_CODEC, H_FIELDS, H_LAYOUT, H_NTENSORS, H_TOTAL, Layout, Payload, require
from fedpeft.errors import ConfigError, PayloadError
from fedpeft.fields import check
from fedpeft.registry import Registry

if TYPE_CHECKING:
    import torch
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

CODECS: Registry[type[Codec]] = Registry("codec")
_CODEC_IDS: dict[int, str] = {}

# What a codec's encoder hands back: (header fields, positions bytes, values bytes, scales or None).
Encoded = tuple[list[int], np.ndarray, np.ndarray, np.ndarray | None]
#: the default decode bound: any finite float32
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class NoParams:
    """Parameters of a codec that takes none."""


def register_codec(name: str) -> Callable[[type[Codec]], type[Codec]]:
    """Class decorator: register a codec under ``name`` (its ``codec_id`` must be unique)."""

    def deco(cls: type[Codec]) -> type[Codec]:
        if cls.codec_id in _CODEC_IDS:
            raise ValueError(f"codec id {cls.codec_id} of {name!r} is taken by {_CODEC_IDS[cls.codec_id]!r}")
        cls.name = name
        CODECS.register(name)(cls)
        _CODEC_IDS[cls.codec_id] = name
        return cls

    return deco


def codec_names() -> list[str]:
    """Names of all registered codecs, sorted."""
    return CODECS.names()


def _validated(cls: type[Codec], values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls.Params)
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    return cls.Params(**{k: check(f"codec {cls.name!r} parameter {k}", fields[k], hints[k], v, text=True)
                         for k, v in values.items()})


class Codec(ABC):
    """Encodes a delta into a :class:`Payload` and decodes (and validates) it back."""

    name: ClassVar[str] = ""
    codec_id: ClassVar[int] = -1
    lossless: ClassVar[bool] = False
    biased: ClassVar[bool] = True  # E[decoded] != x: error feedback helps (off for lossless/unbiased)
    Params: ClassVar[type[DataclassInstance]] = NoParams
    n_fields: ClassVar[int] = 0  # codec-specific header fields
    #: largest |decoded value| / its tensor's scale (int8: 127 levels, sign and compeft: 1); None: values
    #: do not come from per-tensor scales. Lets :meth:`decode` refuse a scale before scale x level overflows.
    scale_gain: ClassVar[float | None] = None

    def __init__(self, params: Any = None) -> None:
        params = self.Params() if params is None else params
        if not isinstance(params, self.Params):
            raise ConfigError(f"codec {self.name!r} takes {self.Params.__name__}, not {type(params).__name__}")
        self.params = _validated(type(self), dataclasses.asdict(params))

    @property
    def spec(self) -> str:
        """The canonical spec string (parses back to an equal codec)."""
        items = list(dataclasses.asdict(self.params).items())
        if not items:
            return self.name
        (_, first), rest = items[0], items[1:]
        return f"{self.name}:{first}" + "".join(f",{k}={v}" for k, v in rest)

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"

    @property
    def wants_fisher(self) -> bool:
        """The encoder ranks by a Fisher estimate (``select=fisher``): a sender should compute one."""
        return getattr(self.params, "select", "magnitude") == "fisher"

    def encode(self, delta: Mapping[str, torch.Tensor], layout: Layout, rng: np.random.Generator | None = None,
               fisher: Mapping[str, torch.Tensor] | None = None) -> Payload:
        """Encode ``delta`` (names and shapes of ``layout``, any float dtype).

        ``fisher`` (optional, same names and shapes, >= 0) is a diagonal estimate of each element's
        curvature, such as the mean squared gradient of local training; sparsifying codecs with
        ``select=fisher`` keep the elements whose loss would suffer most from being dropped. Only the
        sender uses it: nothing of it goes on the wire. Raises :class:`PayloadError` when the delta or
        the Fisher does not match the layout or is not finite.
        """
        flat = layout.flatten(delta)
        if flat.size and not (np.isfinite(flat.max()) and np.isfinite(flat.min())):  # NaN propagates
            raise PayloadError("delta contains NaN or inf; refusing to encode it")
        curvature = None
        if fisher is not None and self.wants_fisher:
            curvature = layout.flatten(fisher)
            if curvature.size and not (np.isfinite(curvature.max()) and curvature.min() >= 0):
                raise PayloadError("fisher weights must be finite and non-negative")
        fields, positions, values, scales = self._encode(flat, layout, rng, curvature)
        assert len(fields) == self.n_fields
        payload = Payload.build(self.codec_id, layout, fields, positions, values, scales)
        log.debug("%s: %d elements -> %d bytes %s", self.spec, layout.total, payload.nbytes, payload.breakdown())
        return payload

    def decode(self, payload: Payload, layout: Layout, bound: float = FLOAT32_MAX) -> dict[str, torch.Tensor]:
        """Decode to float32 tensors of ``layout``; :class:`PayloadError` on any inconsistency.

        Every decoded value is finite and within ``+-bound`` (a receiver's sanity bound, see
        ``sanity.decode_bound``): a payload whose per-tensor scale x largest level would exceed it is
        refused before it is multiplied out, so decoding never overflows to inf.
        """
        require(isinstance(payload, Payload), f"expected a Payload, got {type(payload).__name__}")
        payload = Payload.from_arrays(payload.arrays())  # a Payload may also be built directly
        h = payload.header
        cid = int(h[H_CODEC])
        require(cid == self.codec_id, f"payload was encoded by codec "
                                      f"{_CODEC_IDS.get(cid, f'id {cid}')!r}, expected {self.name!r}")
        require(int(h[H_NTENSORS]) == len(layout.names),
                f"payload has {int(h[H_NTENSORS])} tensors, layout has {len(layout.names)}")
        require(int(h[H_TOTAL]) == layout.total,
                f"payload has {int(h[H_TOTAL])} elements, layout has {layout.total}")
        require(int(h[H_LAYOUT]) == layout.fingerprint, "payload tensor names/shapes differ from the layout")
        require(h.size - H_FIELDS == self.n_fields,
                f"{self.name} header has {h.size - H_FIELDS} fields, expected {self.n_fields}")
        scales = payload.scales
        if self.scale_gain is not None and scales.size:  # in Python floats: the product cannot overflow
            peak = float(scales.max()) * self.scale_gain
            require(peak <= bound, f"{self.name} scale {float(scales.max()):.3g} x level {self.scale_gain:g} "
                                   f"decodes beyond the bound {bound:g}")
        flat = self._decode(payload.fields, payload.positions, payload.values, scales, layout)
        assert flat.dtype == np.float32 and flat.shape == (layout.total,)
        if flat.size:  # NaN fails both comparisons
            lo, hi = float(flat.min()), float(flat.max())
            require(-bound <= lo and hi <= bound, f"{self.name} payload decodes to values in [{lo:.3g}, {hi:.3g}], "
                                                  f"beyond the bound {bound:g}")
        return layout.unflatten(flat)

    @abstractmethod
    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        """Encode a finite float32 vector (read-only: it may be a view of the caller's tensors);
        ``fisher`` is given only when :attr:`wants_fisher`, and may be None."""

    @abstractmethod
    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        """Validate the sections and return the flat float32 vector."""


def per_element(scales: np.ndarray, layout: Layout) -> np.ndarray:
    """Repeat one float32 scale per tensor over that tensor's elements."""
    return np.repeat(scales.astype(np.float32, copy=False), layout.numels)


def per_tensor(ufunc: np.ufunc, values: np.ndarray, layout: Layout, dtype: Any = None) -> np.ndarray:
    """``ufunc`` reduced over each tensor's slice of the flat vector (0 for empty tensors)."""
    out = np.zeros(len(layout.names), dtype=dtype or values.dtype)
    nonempty = np.asarray(layout.numels, dtype=np.int64) > 0
    if nonempty.any():
        out[nonempty] = ufunc.reduceat(values, layout.offsets[:-1][nonempty], dtype=dtype)
    return out


def check_scales(scales: np.ndarray, layout: Layout, what: str = "scales") -> None:
    """One finite, non-negative scale per tensor."""
    require(scales.size == len(layout.names), f"{scales.size} {what} for {len(layout.names)} tensors")
    require(bool((scales >= 0).all()), f"negative {what}")


def make_codec(spec: str) -> Codec:
    """Build a codec from a spec such as ``"compeft:0.05,scale=std,alpha=1.0,scope=global"``."""
    known = ", ".join(codec_names())
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty codec spec {spec!r}; known codecs: {known}")
    head, *items = [part.strip() for part in spec.split(",")]
    name, colon, positional = (s.strip() for s in head.partition(":"))
    if name not in CODECS:
        raise ConfigError(f"codec spec {spec!r}: unknown codec {name!r}; known codecs: {known}")
    cls = CODECS.get(name)
    fields = [f.name for f in dataclasses.fields(cls.Params)]
    valid = f"valid keys for {name}: {', '.join(fields)}" if fields else f"{name} takes no parameters"
    values: dict[str, Any] = {}
    if colon:
        if not fields:
            raise ConfigError(f"codec spec {spec!r}: {name} takes no parameters")
        if not positional:
            raise ConfigError(f"codec spec {spec!r}: empty value after ':' ({valid})")
        values[fields[0]] = positional
    for item in items:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ConfigError(f"codec spec {spec!r}: {item!r} is not key=value ({valid})")
        if key not in fields:
            raise ConfigError(f"codec spec {spec!r}: unknown key {key!r}; {valid}")
        if key in values:
            raise ConfigError(f"codec spec {spec!r}: {key!r} is given twice")
        values[key] = value
    return cls(_validated(cls, values))
