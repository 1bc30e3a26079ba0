"""The framed tensor format of the split-learning stream: a dict of named tensors, no pickle.

One frame is one gRPC message. All integers are little-endian::

    header (24 bytes)  magic b"FPSF" | version u8 | kind u8 | flags u8 | code u8 | step i64
                       | n_tensors u16 | client_id_len u16 | text_len u32
    client_id          UTF-8, client_id_len bytes
    text               UTF-8, text_len bytes (an open: session token, newline, fingerprint; a forward,
                       backward or close: the session token; an error: its message)
    per tensor         name_len u16 | dtype u8 | wire u8 | ndim u8 | name (UTF-8)
                       | ndim x u64 dims | nbytes u64 | nbytes raw bytes (C order)

``dtype`` is the tensor's own dtype, ``wire`` how its bytes travel: the same dtype, or bf16 (raw
uint16 bits) for a float32/float64 tensor when the sender chose the bf16 wire; the receiver gets the
tensor back in ``dtype``. ``flags`` bit 0 says the sender wants bf16 in the reply too. For a reply,
``code`` is the kind of the request it answers; for an error, an :class:`ErrorCode`.

:func:`decode` checks the whole frame (magic, version, kind, flags, counts, string lengths, dtype
whitelist, ndim, every dim, shape product against the byte count, the total decoded size) before it
allocates any tensor, and raises :class:`~fedpeft.errors.SplitError` on anything malformed; a
server's limits also bound the tokens of every ``[batch, tokens, ...]`` tensor (``max_seq_len``,
``max_tokens``) at that point.
"""

from __future__ import annotations

import math
import secrets
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

from fedpeft.errors import SplitError

Tensors = dict[str, torch.Tensor]

MAGIC = b"FPSF"
VERSION = 1
FLAG_BF16 = 0x01
_HEADER = struct.Struct("<4sBBBBqHHI")
_TENSOR = struct.Struct("<HBBB")
_U64 = struct.Struct("<Q")


class Kind(IntEnum):
    """What a frame is: a request (client -> server) or an answer (server -> client)."""

    OPEN = 1
    FORWARD = 2
    BACKWARD = 3
    CLOSE = 4
    REPLY = 5
    ERROR = 6


class ErrorCode(IntEnum):
    """Why the server answered with an error; the client retries only the recoverable ones."""

    INTERNAL = 1      # the body failed unexpectedly (fatal for the call)
    MALFORMED = 2     # the request frame failed validation, e.g. too many tokens (fatal)
    REJECTED = 3      # the body refused the request, e.g. a fingerprint mismatch (fatal)
    NOT_OPEN = 4      # no session for this client in this server process: re-open, then retry
    STATE_LOST = 5    # backward without the forward state (server restarted): replay the forward
    DENIED = 6        # the session belongs to another holder (wrong session token) (fatal)
    LIMIT = 7         # a server limit is reached, e.g. split.max_sessions (fatal for the call)


REJOIN = 1  # ``code`` of an OPEN frame sent after a reconnect: keep the session's state
TOKEN_CHARS = 32  # a session token: 16 random bytes in hex, chosen by the client at open


def session_token() -> str:
    """A fresh secret session token (the client keeps it for the life of its session)."""
    return secrets.token_hex(TOKEN_CHARS // 2)


def open_text(token: str, fingerprint: str) -> str:
    """The text of an open frame: the session token, a newline, the model/cut fingerprint."""
    return f"{token}\n{fingerprint}"


def parse_open_text(text: str) -> tuple[str, str]:
    """``(token, fingerprint)`` of an open frame's text; ``SplitError`` if there is no valid token."""
    token, sep, fingerprint = text.partition("\n")
    if not sep or len(token) != TOKEN_CHARS or not all(c in "0123456789abcdef" for c in token):
        raise SplitError(f"an open must carry a {TOKEN_CHARS}-hex-digit session token, a newline and the "
                         f"fingerprint (a client older than this server?)")
    return token, fingerprint


# code -> (torch dtype, numpy wire dtype); the numpy dtype is how the raw bytes are read
_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    1: (torch.float32, "<f4"), 2: (torch.float16, "<f2"), 3: (torch.bfloat16, "<i2"),
    4: (torch.float64, "<f8"), 5: (torch.int64, "<i8"), 6: (torch.int32, "<i4"), 7: (torch.int16, "<i2"),
    8: (torch.int8, "i1"), 9: (torch.uint8, "u1"), 10: (torch.bool, "u1"),
}
_CODE = {dt: code for code, (dt, _) in _DTYPES.items()}
_BF16 = _CODE[torch.bfloat16]
_TO_BF16 = (torch.float32, torch.float64)  # float16 stays float16 on a bf16 wire: same size, more precision


@dataclass(frozen=True)
class Limits:
    """Bounds a received frame must respect; checked before anything is allocated."""

    max_frame_bytes: int = 256 << 20
    max_decoded_bytes: int = 1 << 30     # total size of the decoded tensors (bf16 -> fp32 doubles it)
    max_tensors: int = 64
    max_name_bytes: int = 256
    max_client_id_bytes: int = 256
    max_text_bytes: int = 4096
    max_ndim: int = 8
    require_finite: bool = False         # reject NaN/inf in floating tensors
    max_seq_len: int = 0                 # dim 1 of a tensor of 2+ dims ([B, T, ...]) at most this; 0 = unbounded
    max_tokens: int = 0                  # dims 0 x 1 (B x T) of a tensor of 2+ dims at most this; 0 = unbounded


@dataclass
class Frame:
    """A decoded frame."""

    kind: Kind
    client_id: str
    step: int
    tensors: Tensors = field(default_factory=dict)
    text: str = ""
    code: int = 0
    flags: int = 0

    @property
    def wire_dtype(self) -> str | None:
        """``"bf16"`` if the sender asked for the bf16 wire, else ``None``."""
        return "bf16" if self.flags & FLAG_BF16 else None


def _wire_flag(wire_dtype: str | torch.dtype | None) -> int:
    if wire_dtype is None or wire_dtype in ("fp32", "none", "exact"):
        return 0
    if wire_dtype in ("bf16", "bfloat16", torch.bfloat16):
        return FLAG_BF16
    raise SplitError(f"wire dtype {wire_dtype!r} is not supported; use None (exact) or 'bf16'")


def _tensor_code(name: str, t: torch.Tensor) -> int:
    if not isinstance(t, torch.Tensor):
        raise SplitError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    code = _CODE.get(t.dtype)
    if code is None:
        allowed = ", ".join(str(dt).removeprefix("torch.") for dt in _CODE)
        raise SplitError(f"tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                         f"the wire carries only {allowed}")
    return code


def _utf8(text: str, what: str, limit: int) -> bytes:
    data = text.encode("utf-8")
    if len(data) > limit:
        raise SplitError(f"{what} is {len(data)} bytes; at most {limit} fit in a frame")
    return data


def _tensor_parts(name: str, t: torch.Tensor, flags: int) -> list[bytes | memoryview]:
    code = _tensor_code(name, t)
    name_b = _utf8(name, f"tensor name {name[:40]!r}", 0xFFFF)
    if not name_b:
        raise SplitError("tensor names must not be empty")
    if t.dim() > 255:
        raise SplitError(f"tensor {name!r} has {t.dim()} dims; at most 255 fit in a frame")
    x = t.detach().to("cpu").contiguous()
    wire = code
    if flags & FLAG_BF16 and x.dtype in _TO_BF16:
        x, wire = x.to(torch.bfloat16), _BF16
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    arr = x.numpy().reshape(-1)
    if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts only
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    payload = arr.view(np.uint8).data if arr.size else b""
    shape = b"".join(_U64.pack(d) for d in x.shape)
    return [_TENSOR.pack(len(name_b), code, wire, x.dim()), name_b, shape, _U64.pack(arr.nbytes), payload]


def encode(kind: Kind | int, client_id: str, step: int, tensors: Tensors | None = None, *,
           wire_dtype: str | torch.dtype | None = None, text: str = "", code: int = 0) -> bytes:
    """Serialize one frame; ``wire_dtype="bf16"`` sends float32/float64 tensors as bf16 bits."""
    kind = Kind(kind)
    flags = _wire_flag(wire_dtype)
    tensors = tensors or {}
    if len(tensors) > 0xFFFF:
        raise SplitError(f"{len(tensors)} tensors do not fit in one frame (at most 65535)")
    if not -(1 << 63) <= step < (1 << 63) or not 0 <= code <= 255:
        raise SplitError(f"step {step} or code {code} out of range")
    cid = _utf8(client_id, "client id", 0xFFFF)
    txt = _utf8(text, "frame text", 0xFFFFFFFF)
    parts: list[bytes | memoryview] = [_HEADER.pack(MAGIC, VERSION, kind, flags, code, step, len(tensors),
                                                    len(cid), len(txt)), cid, txt]
    for name, t in tensors.items():
        parts.extend(_tensor_parts(name, t, flags))
    return b"".join(parts)


def encoded_size(tensors: Tensors, wire_dtype: str | torch.dtype | None = None, client_id: str = "",
                 text: str = "") -> int:
    """The size in bytes of :func:`encode` for these tensors, computed without serializing."""
    flags = _wire_flag(wire_dtype)
    size = _HEADER.size + len(client_id.encode()) + len(text.encode())
    for name, t in tensors.items():
        _tensor_code(name, t)
        item = 2 if flags & FLAG_BF16 and t.dtype in _TO_BF16 else t.element_size()
        size += _TENSOR.size + len(name.encode()) + 8 * t.dim() + 8 + item * t.numel()
    return size


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: int
    wire: int
    shape: tuple[int, ...]
    offset: int
    numel: int


class _Reader:
    """Bounds-checked cursor over the received bytes."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise SplitError(f"frame truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"only {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def text(self, n: int, what: str) -> str:
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SplitError(f"{what} is not valid UTF-8") from exc


def _parse_tensor(r: _Reader, i: int, limits: Limits) -> _Spec:
    name_len, dtype, wire, ndim = _TENSOR.unpack(r.take(_TENSOR.size, f"tensor {i} header"))
    if not 0 < name_len <= limits.max_name_bytes:
        raise SplitError(f"tensor {i}: name length {name_len} outside 1..{limits.max_name_bytes}")
    name = r.text(name_len, f"tensor {i} name")
    if dtype not in _DTYPES:
        raise SplitError(f"tensor {name!r}: unknown dtype code {dtype} (known: {sorted(_DTYPES)})")
    if wire != dtype and not (wire == _BF16 and _DTYPES[dtype][0] in _TO_BF16):
        raise SplitError(f"tensor {name!r}: wire dtype code {wire} cannot carry dtype code {dtype}")
    if ndim > limits.max_ndim:
        raise SplitError(f"tensor {name!r}: {ndim} dims, at most {limits.max_ndim} allowed")
    dims = struct.unpack(f"<{ndim}Q", r.take(8 * ndim, f"tensor {name!r} shape"))
    if any(d > limits.max_decoded_bytes for d in dims):  # an empty tensor may not carry an absurd dimension
        raise SplitError(f"tensor {name!r}: dimension {max(dims)} exceeds {limits.max_decoded_bytes}")
    if ndim >= 2:  # activations, gradients and masks are [batch, tokens, ...]: bound the work before any
        _check_tokens(name, dims[0], dims[1], limits)
    (nbytes,) = _U64.unpack(r.take(8, f"tensor {name!r} byte count"))
    item = np.dtype(_DTYPES[wire][1]).itemsize
    numel = math.prod(dims)  # python ints: no overflow; checked against the real byte count below
    if numel * item != nbytes:
        raise SplitError(f"tensor {name!r}: shape {list(dims)} x {item} bytes = {numel * item}, "
                         f"but the frame declares {nbytes} bytes")
    offset = r.pos
    r.take(nbytes, f"tensor {name!r} data")
    return _Spec(name, dtype, wire, tuple(dims), offset, numel)


def _check_tokens(name: str, batch: int, seq: int, limits: Limits) -> None:
    if limits.max_seq_len and seq > limits.max_seq_len:
        raise SplitError(f"tensor {name!r}: sequence of {seq} tokens; this server takes at most {limits.max_seq_len} "
                         f"(the model's max_length)")
    if limits.max_tokens and batch * seq > limits.max_tokens:
        raise SplitError(f"tensor {name!r}: {batch} x {seq} = {batch * seq} tokens in one frame; this server takes "
                         f"at most {limits.max_tokens} (split.max_frame_tokens)")


def _materialize(buf: memoryview, spec: _Spec, limits: Limits) -> torch.Tensor:
    dtype = _DTYPES[spec.dtype][0]
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=dtype)
    arr = np.frombuffer(buf, dtype=_DTYPES[spec.wire][1], count=spec.numel, offset=spec.offset).copy()
    if spec.dtype == _CODE[torch.bool]:
        if int(arr.max()) > 1:
            raise SplitError(f"tensor {spec.name!r}: bool values must be 0 or 1")
        arr = arr.view(np.bool_)
    t = torch.from_numpy(arr)
    if spec.wire == _BF16:
        t = t.view(torch.bfloat16)
    t = t.to(dtype).reshape(spec.shape)
    if limits.require_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise SplitError(f"tensor {spec.name!r} holds NaN or infinite values")
    return t


def decode(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Frame:
    """Validate and deserialize one frame; any malformed input raises :class:`SplitError`."""
    buf = memoryview(data).cast("B")
    if len(buf) > limits.max_frame_bytes:
        raise SplitError(f"frame of {len(buf)} bytes exceeds the limit of {limits.max_frame_bytes}")
    if len(buf) < _HEADER.size:
        raise SplitError(f"frame truncated: {len(buf)} bytes, the header alone is {_HEADER.size}")
    magic, version, kind, flags, code, step, n, cid_len, text_len = _HEADER.unpack(buf[:_HEADER.size])
    if magic != MAGIC:
        raise SplitError(f"not a fedpeft split frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise SplitError(f"frame version {version} is not supported (this side speaks {VERSION})")
    if kind not in Kind._value2member_map_:
        raise SplitError(f"unknown frame kind {kind}")
    if flags & ~FLAG_BF16:
        raise SplitError(f"unknown frame flags 0x{flags:02x}")
    if n > limits.max_tensors:
        raise SplitError(f"frame declares {n} tensors, at most {limits.max_tensors} allowed")
    if cid_len > limits.max_client_id_bytes or text_len > limits.max_text_bytes:
        raise SplitError(f"client id ({cid_len} bytes) or text ({text_len} bytes) too long "
                         f"(limits {limits.max_client_id_bytes}, {limits.max_text_bytes})")
    r = _Reader(buf)
    r.pos = _HEADER.size
    client_id = r.text(cid_len, "client id")
    text = r.text(text_len, "frame text")
    specs: list[_Spec] = []
    decoded = 0
    for i in range(n):
        spec = _parse_tensor(r, i, limits)
        if any(s.name == spec.name for s in specs):
            raise SplitError(f"tensor name {spec.name!r} appears twice")
        decoded += spec.numel * _DTYPES[spec.dtype][0].itemsize
        if decoded > limits.max_decoded_bytes:
            raise SplitError(f"decoded tensors would take more than {limits.max_decoded_bytes} bytes")
        specs.append(spec)
    if r.pos != len(buf):
        raise SplitError(f"{len(buf) - r.pos} unexpected bytes after the last tensor")
    tensors = {s.name: _materialize(buf, s, limits) for s in specs}
    return Frame(Kind(kind), client_id, step, tensors, text, code, flags)
