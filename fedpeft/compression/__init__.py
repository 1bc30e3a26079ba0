"""Codecs for adapter deltas: ComPEFT, quantizers, top-k; bit-level coding; error feedback.

Pure numpy/torch (no Flower). Typical use::

    layout = Layout.from_state(delta)
    codec = make_codec("compeft:0.1")
    arrays = codec.encode(delta, layout).arrays()            # -> ArrayRecord on the wire
    decoded = codec.decode(Payload.from_arrays(arrays), layout)  # PayloadError if anything is off
"""

from fedpeft.compression import compeft, dense, qsgd, secure, sign, topk  # noqa: F401  (register the codecs)
from fedpeft.compression.base import CODECS, Codec, codec_names, make_codec, register_codec
from fedpeft.compression.bits import entropy_bound_bits
from fedpeft.compression.feedback import ErrorFeedback
from fedpeft.compression.payload import Layout, Payload

__all__ = ["CODECS", "Codec", "ErrorFeedback", "Layout", "Payload", "codec_names", "entropy_bound_bits",
           "make_codec", "register_codec"]
