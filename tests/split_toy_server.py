"""A toy split body and a script that serves it (for the transport tests; not part of the product).

``ToyBody`` is a deterministic per-client ``tanh(Linear)`` body trained with plain SGD: the same
calls give bit-identical results in-process and over the wire. Run as a script, it serves one on
loopback: ``python tests/split_toy_server.py --port P [--state-dir D] [--save-every N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from fedpeft.errors import SplitError

FINGERPRINT = "toy-linear-16"


class ToyBody:
    """Per-client ``tanh(x W^T + b)``; backward applies one SGD step to that client's W and b."""

    thread_safe = True  # per-client state; the transport serializes calls of one client

    def __init__(self, dim: int = 16, lr: float = 0.1, seed: int = 0, fingerprint: str = FINGERPRINT,
                 delay: float = 0.0, slow_steps: set[int] | None = None,
                 barrier: threading.Barrier | None = None) -> None:
        self.dim, self.lr, self.seed, self.fingerprint = dim, lr, seed, fingerprint
        self.delay, self.barrier = delay, barrier
        self.slow_steps = slow_steps  # steps whose backward sleeps ``delay`` (None: all)
        self.weights: dict[str, list[torch.Tensor]] = {}
        self.saved: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self.backward_calls = 0
        self._lock = threading.Lock()

    def _init(self, client_id: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(client_id.encode()))
        return [torch.randn(self.dim, self.dim, generator=g) / self.dim ** 0.5, torch.zeros(self.dim)]

    def open(self, client_id: str, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise SplitError(f"fingerprint {fingerprint!r} does not match the server's {self.fingerprint!r}")
        with self._lock:
            self.weights.setdefault(client_id, self._init(client_id))
            for key in [k for k in self.saved if k[0] == client_id]:  # like BodyServer: (re)open drops pending
                del self.saved[key]

    def forward(self, client_id: str, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.barrier is not None:
            self.barrier.wait(timeout=5)  # only passes if two clients are inside forward at once
        w, b = (p.detach().requires_grad_() for p in self.weights[client_id])
        x = tensors["hidden"].detach().requires_grad_()
        y = torch.tanh(x @ w.T + b) * tensors["attention_mask"].unsqueeze(-1)
        with self._lock:
            self.saved[(client_id, step)] = (x, y, w, b)
        return {"hidden": y.detach()}

    def backward(self, client_id: str, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            if (client_id, step) not in self.saved:
                raise SplitError(f"no forward state for {client_id} step {step}")
            x, y, w, b = self.saved.pop((client_id, step))
        if self.delay and (self.slow_steps is None or step in self.slow_steps):
            time.sleep(self.delay)
        y.backward(tensors["grad"])
        with torch.no_grad():
            self.weights[client_id] = [w.detach() - self.lr * w.grad, b.detach() - self.lr * b.grad]
        self.backward_calls += 1
        return {"grad": x.grad}

    def close(self, client_id: str) -> None:
        with self._lock:
            for key in [k for k in self.saved if k[0] == client_id]:
                del self.saved[key]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        ids = sorted(self.weights)
        (path / "clients.json").write_text(json.dumps(ids))
        for i, cid in enumerate(ids):
            np.save(path / f"{i}-w.npy", self.weights[cid][0].numpy())
            np.save(path / f"{i}-b.npy", self.weights[cid][1].numpy())

    def load(self, path: Path) -> None:
        ids = json.loads((path / "clients.json").read_text())
        self.weights = {cid: [torch.from_numpy(np.load(path / f"{i}-{k}.npy", allow_pickle=False)) for k in "wb"]
                        for i, cid in enumerate(ids)}


def main() -> None:
    from fedpeft.split.server import serve, serve_forever

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--save-every", type=int, default=1)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = serve(ToyBody(delay=args.delay), "127.0.0.1", args.port, state_dir=args.state_dir,
                   save_every=args.save_every)
    logging.getLogger("toy").info("ready on port %d", server.port)
    serve_forever(server)


if __name__ == "__main__":
    main()
