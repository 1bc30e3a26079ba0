"""The wire format: a tensor :class:`Layout` both sides agree on, and the packed :class:`Payload`.

A payload is at most three flat numpy arrays, so it maps onto one Flower ``ArrayRecord`` with few
per-array overheads:

``header``  int64, ``[magic|version, codec id, n tensors, total elements, layout fingerprint,
            positions bytes, values bytes, n scales, codec fields...]``
``buffer``  uint8, the positions section followed by the values section
``scales``  float32, per-tensor scales (omitted from :meth:`Payload.arrays` when empty)

Nothing here trusts the sender: :meth:`Payload.from_arrays` checks keys, dtypes, shapes, the magic,
section lengths and scale finiteness; the codec then checks its own fields against the layout.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedpeft import lazy
from fedpeft.errors import PayloadError

if TYPE_CHECKING:
    import torch
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)

VERSION = 1
MAGIC_BASE = 0x46504546_5443_00  # "FPEFTC" followed by a version byte
MAGIC = MAGIC_BASE | VERSION
H_MAGIC, H_CODEC, H_NTENSORS, H_TOTAL, H_LAYOUT, H_POS, H_VAL, H_NSCALES = range(8)
H_FIELDS = 8  # first codec-specific header field
MAX_FIELDS = 16
MAX_TOTAL = 2**31 - 1  # keeps every position/gap sum comfortably inside int64
ARRAY_DTYPES = {"header": np.dtype("<i8"), "buffer": np.dtype("u1"), "scales": np.dtype("<f4")}


def require(cond: bool, reason: str) -> None:
    """Raise :class:`PayloadError` with ``reason`` unless ``cond`` holds."""
    if not cond:
        raise PayloadError(reason)


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the tensors that travel, in sorted-name order; both sides build it locally."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...] = field(init=False)
    total: int = field(init=False)
    offsets: np.ndarray = field(init=False, repr=False, compare=False)
    fingerprint: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes) or len(set(self.names)) != len(self.names):
            raise ValueError("layout names must be unique and match the shapes")
        numels = tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)
        total = sum(numels)
        if total > MAX_TOTAL:
            raise ValueError(f"layout has {total} elements; at most {MAX_TOTAL} are supported")
        offsets = np.zeros(len(numels) + 1, dtype=np.int64)
        np.cumsum(numels, out=offsets[1:])
        text = "\n".join(f"{n}:{tuple(s)}" for n, s in zip(self.names, self.shapes)).encode()
        fp = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)
        object.__setattr__(self, "numels", numels)
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "fingerprint", fp)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        """Layout of a state dict, ordered by sorted name (independent of dict order)."""
        names = tuple(sorted(state))
        return cls(names, tuple(tuple(int(d) for d in state[n].shape) for n in names))

    def check(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`PayloadError` unless ``delta`` has exactly this layout's names and shapes."""
        known = set(self.names)
        missing = [n for n in self.names if n not in delta]
        extra = [n for n in delta if n not in known]
        require(not missing and not extra,
                f"tensor names do not match the layout: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, s in zip(self.names, self.shapes):
            got = tuple(int(d) for d in delta[n].shape)
            require(got == s, f"tensor {n!r} has shape {got}, layout says {s}")

    def flatten(self, delta: Mapping[str, torch.Tensor]) -> np.ndarray:
        """One float32 vector of all tensors in layout order (a view when no copy is needed)."""
        self.check(delta)
        parts = []
        for n in self.names:
            t = delta[n].detach()
            if t.dtype != torch.float32:
                t = t.float()
            parts.append(t.cpu().reshape(-1).numpy())
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a float32 vector of ``total`` elements into named tensors (views into ``flat``)."""
        assert flat.dtype == np.float32 and flat.shape == (self.total,)
        base = torch.from_numpy(flat)
        return {n: base[int(self.offsets[i]):int(self.offsets[i + 1])].view(s)
                for i, (n, s) in enumerate(zip(self.names, self.shapes))}

    def counts(self, positions: np.ndarray) -> np.ndarray:
        """How many of the sorted flat ``positions`` fall in each tensor."""
        return np.diff(np.searchsorted(positions, self.offsets))

    def tensor_ids(self, positions: np.ndarray) -> np.ndarray:
        """Index of the tensor holding each of the sorted flat ``positions``."""
        if len(self.names) <= 1:
            return np.zeros(positions.shape, dtype=np.intp)
        return np.repeat(np.arange(len(self.names)), self.counts(positions))


@dataclass(frozen=True, eq=False)
class Payload:
    """An encoded update: an int64 header, a uint8 buffer (positions + values) and float32 scales."""

    header: np.ndarray
    buffer: np.ndarray
    scales: np.ndarray

    @classmethod
    def build(cls, codec_id: int, layout: Layout, fields: list[int], positions: np.ndarray,
              values: np.ndarray, scales: np.ndarray | None = None) -> Payload:
        """Assemble a payload from the encoder's sections (used by codecs)."""
        scales = np.zeros(0, np.float32) if scales is None else np.ascontiguousarray(scales, np.float32)
        head = [MAGIC, codec_id, len(layout.names), layout.total, layout.fingerprint,
                positions.nbytes, values.nbytes, scales.size, *fields]
        buffer = np.concatenate([positions.view(np.uint8).reshape(-1), values.view(np.uint8).reshape(-1)])
        return cls(np.asarray(head, dtype=np.int64), buffer, scales)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Payload:
        """Validate received arrays (keys, dtypes, 1-D, magic, section lengths, finite scales)."""
        require(isinstance(arrays, Mapping), "payload must be a mapping of arrays")
        keys = set(arrays)
        require(keys <= set(ARRAY_DTYPES), f"unexpected payload arrays: {sorted(keys - set(ARRAY_DTYPES))}")
        require({"header", "buffer"} <= keys, f"payload lacks arrays: {sorted({'header', 'buffer'} - keys)}")
        got = {}
        for key in keys:
            a = arrays[key]
            require(isinstance(a, np.ndarray), f"payload array {key!r} is {type(a).__name__}, not ndarray")
            require(a.dtype == ARRAY_DTYPES[key], f"payload array {key!r} has dtype {a.dtype}, "
                                                  f"expected {ARRAY_DTYPES[key]}")
            require(a.ndim == 1, f"payload array {key!r} has {a.ndim} dimensions, expected 1")
            got[key] = np.ascontiguousarray(a)
        header, buffer = got["header"], got["buffer"]
        scales = got.get("scales", np.zeros(0, np.float32))
        require(H_FIELDS <= header.size <= H_FIELDS + MAX_FIELDS,
                f"header has {header.size} fields, expected {H_FIELDS}..{H_FIELDS + MAX_FIELDS}")
        magic = int(header[H_MAGIC])
        require(magic & ~0xFF == MAGIC_BASE, "not a fedpeft payload (bad magic)")
        require(magic == MAGIC, f"unsupported payload version {magic & 0xFF}; this build reads {VERSION}")
        for i, what in ((H_NTENSORS, "tensor count"), (H_TOTAL, "element count"),
                        (H_POS, "positions length"), (H_VAL, "values length"), (H_NSCALES, "scale count")):
            require(0 <= int(header[i]) <= MAX_TOTAL * 8 + 8, f"header {what} {int(header[i])} out of range")
        require(int(header[H_POS]) + int(header[H_VAL]) == buffer.size,
                f"buffer has {buffer.size} bytes, header declares {int(header[H_POS])} + {int(header[H_VAL])}")
        require(int(header[H_NSCALES]) == scales.size,
                f"scales has {scales.size} entries, header declares {int(header[H_NSCALES])}")
        require(bool(np.isfinite(scales).all()), "scales contain NaN or inf")
        return cls(header, buffer, scales)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to put on the wire (``scales`` only when non-empty)."""
        out = {"header": self.header, "buffer": self.buffer}
        if self.scales.size:
            out["scales"] = self.scales
        return out

    @property
    def codec_id(self) -> int:
        return int(self.header[H_CODEC])

    @property
    def fields(self) -> tuple[int, ...]:
        """The codec-specific header fields."""
        return tuple(int(v) for v in self.header[H_FIELDS:])

    @property
    def positions(self) -> np.ndarray:
        """The positions section of the buffer."""
        return self.buffer[: int(self.header[H_POS])]

    @property
    def values(self) -> np.ndarray:
        """The values section of the buffer."""
        return self.buffer[int(self.header[H_POS]):]

    @property
    def nbytes(self) -> int:
        """Content bytes on the wire (header + buffer + scales)."""
        return int(self.header.nbytes + self.buffer.nbytes + self.scales.nbytes)

    def breakdown(self) -> dict[str, int]:
        """Bytes per kind of content; sums to :attr:`nbytes`."""
        return {"positions": int(self.header[H_POS]), "values": int(self.header[H_VAL]),
                "scales": int(self.scales.nbytes), "header": int(self.header.nbytes)}
