"""The split server against anyone who can reach its port: one real `fedpeft split-server` process
(tiny BERT, mutual TLS, small limits) attacked by clients with their own valid certificates.

Each attack is one test: hijacking another client's session by its id, a forward far longer than
the model's max_length, idle streams that used to take every worker thread, and a flood of
sessions. In every case the attacker gets a clear refusal and the honest client ("alice") trains on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from fedpeft import certs, config
from fedpeft.errors import SplitError
from fedpeft.split.frames import REJOIN, ErrorCode, Frame, Kind, decode, encode, open_text, session_token
from fedpeft.split.transport import METHOD, GrpcBody, RetryPolicy

from conftest import tiny_overrides, write_classification

log = logging.getLogger(__name__)
FAST = RetryPolicy(initial=0.05, multiplier=2.0, max_delay=0.5, total=10.0)
IDLE = 2.0  # split.idle_timeout of the server under attack
LIMITS = {"split.max_sessions": 12, "split.max_sessions_per_identity": 4, "split.max_streams": 16,
          "split.max_streams_per_identity": 2, "split.idle_timeout": IDLE, "split.max_frame_tokens": 4096}
CLIENTS = ("alice", "mallory-hijack", "mallory-long", "mallory-memory", "mallory-idle", "mallory-flood")


@dataclass
class Server:
    """The split-server process under attack and what a client needs to talk to it."""

    proc: subprocess.Popen
    address: str
    pki: Path
    fingerprint: str
    hidden: int
    max_length: int
    log: Path

    def logged(self, text: str) -> int:
        """How often the server's log (-v: info lines too; wrapped by the console) holds ``text``."""
        return " ".join(self.log.read_text(errors="replace").split()).count(text)

    def rss(self) -> int:
        """The server process's resident memory in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def body(self, name: str, **kw: object) -> GrpcBody:
        """An honest client with ``name``'s certificate."""
        return GrpcBody(self.address, ca_cert=self.pki / "ca.crt", client_cert=self.pki / f"{name}.crt",
                        client_key=self.pki / f"{name}.key", retry=FAST, **kw)  # type: ignore[arg-type]

    def channel(self, name: str) -> grpc.Channel:
        """A raw mutual-TLS channel with ``name``'s certificate (an attacker writes its own frames)."""
        pki = self.pki
        creds = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (pki / f"{name}.key").read_bytes(),
                                             (pki / f"{name}.crt").read_bytes())
        return grpc.secure_channel(self.address, creds)


class RawStream:
    """One stream on which the test sends frames one at a time and reads each answer."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)(
            iter(self.requests.get, None))
        self.answers: Iterator[bytes] = iter(self.call)

    def send(self, data: bytes) -> Frame:
        self.requests.put(data)
        return decode(next(self.answers))

    def end(self) -> None:
        self.requests.put(None)
        self.call.cancel()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from fedpeft.deploy.flower import free_port
    from fedpeft.runtime import Runtime
    from fedpeft.split.cut import cut_model

    tmp = tmp_path_factory.mktemp("split-hardening")
    pki = tmp / "pki"
    certs.make_certs("localhost", pki)
    for name in CLIENTS:
        certs.make_client_cert(pki, name)
    cfg = config.load(None, tiny_overrides(write_classification(tmp / "topics.jsonl"), tmp / "runs", **{
        "run.device": "cpu", "split.enabled": True, "split.front_layers": 1, "split.back_layers": 0, **LIMITS}))
    scenario = tmp / "scenario.toml"
    scenario.write_text(cfg.to_toml())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "-v", "split-server", str(scenario), "--port",
                             str(port), "--certs", str(pki)], stdout=subprocess.PIPE,
                            stderr=open(tmp / "server.log", "wb"), start_new_session=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        fingerprint = cut_model(Runtime(cfg).model, cfg.model.task, 1, 0).fingerprint  # while the server boots
        line = proc.stdout.readline() if proc.stdout else ""
        assert line and json.loads(line)["split_server"].endswith(f":{port}"), (tmp / "server.log").read_text()
        yield Server(proc, f"localhost:{port}", pki, fingerprint, cfg.model.tiny_hidden_size, cfg.model.max_length,
                     tmp / "server.log")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the split server died under attack"


def _forward(hidden: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden": torch.randn(batch, seq, hidden, generator=g), "attention_mask": torch.ones(batch, seq).long()}


def _train(server: Server, remote: GrpcBody, cid: str, steps: int = 2) -> None:
    """An honest client's steps: open, forward + backward per step, close."""
    remote.open(cid, server.fingerprint)
    for step in range(1, steps + 1):
        out = remote.forward(cid, step, _forward(server.hidden, 2, 8, step))["hidden"]
        grad = remote.backward(cid, step, {"grad": torch.ones_like(out)})["grad"]
        assert grad.shape == out.shape and torch.isfinite(grad).all()
    remote.close(cid)


def test_another_client_cannot_step_or_close_a_session_by_its_id(server: Server) -> None:
    """The hijack: mallory knows alice's client id and sends a backward for her step and a close."""
    with server.body("alice") as alice:
        alice.open("victim", server.fingerprint)
        out = alice.forward("victim", 1, _forward(server.hidden, 2, 8))["hidden"]
        mallory = RawStream(server.channel("mallory-hijack"))
        stolen = session_token()  # a guess: alice's token never left her process
        hijack = mallory.send(encode(Kind.BACKWARD, "victim", 1, {"grad": torch.full_like(out, 2.0)}, text=stolen))
        assert (hijack.kind, hijack.code) == (Kind.ERROR, ErrorCode.NOT_OPEN)  # mallory sees only her own sessions
        rejoin = mallory.send(encode(Kind.OPEN, "victim", 0, text=open_text(stolen, server.fingerprint), code=REJOIN))
        assert rejoin.kind == Kind.REPLY  # ... and may open her own "victim", which is not alice's
        hijack = mallory.send(encode(Kind.BACKWARD, "victim", 1, {"grad": torch.full_like(out, 2.0)}, text=stolen))
        assert (hijack.kind, hijack.code) == (Kind.ERROR, ErrorCode.STATE_LOST)
        assert mallory.send(encode(Kind.CLOSE, "victim", 0, text=stolen)).kind == Kind.REPLY
        mallory.end()
        grad = alice.backward("victim", 1, {"grad": torch.ones_like(out)})["grad"]  # her step 1 was not applied
        assert grad.shape == out.shape and alice.stats.replays == 0
        out = alice.forward("victim", 2, _forward(server.hidden, 2, 8, 2))["hidden"]
        alice.backward("victim", 2, {"grad": torch.ones_like(out)})
        alice.close("victim")


def test_a_sequence_beyond_max_length_is_refused_before_any_work(server: Server) -> None:
    """The long sequence: a valid 1 MiB forward of 4,000 tokens, then a batch over the token budget."""
    mallory = RawStream(server.channel("mallory-long"))
    token = session_token()
    assert mallory.send(encode(Kind.OPEN, "long", 0, text=open_text(token, server.fingerprint))).kind == Kind.REPLY
    before = server.rss()
    frame = encode(Kind.FORWARD, "long", 1, _forward(server.hidden, 1, 4000), text=token)
    assert len(frame) > 1_000_000
    answer = mallory.send(frame)
    assert (answer.kind, answer.code) == (Kind.ERROR, ErrorCode.MALFORMED)
    assert f"at most {server.max_length} (the model's max_length)" in answer.text
    answer = mallory.send(encode(Kind.FORWARD, "long", 2, _forward(server.hidden, 100, 48), text=token))
    assert (answer.kind, answer.code) == (Kind.ERROR, ErrorCode.MALFORMED)
    assert "100 x 48 = 4800 tokens" in answer.text and "split.max_frame_tokens" in answer.text
    grown = server.rss() - before
    log.info("server RSS grew by %.1f MB over the refused 4,000-token frame", grown / 1e6)
    assert grown < 64e6
    within = mallory.send(encode(Kind.FORWARD, "long", 3, _forward(server.hidden, 4, server.max_length), text=token))
    assert within.kind == Kind.REPLY  # a frame inside the limits is served
    freed = server.logged("freed the forward state of mallory-long/long")
    mallory.end()  # ... and its forward state is freed with the stream: a rejoin finds nothing to backpropagate
    # (once the server has seen the stream end: a rejoin that overtakes it keeps the state, as a reconnect should)
    deadline = time.time() + 30
    while server.logged("freed the forward state of mallory-long/long") == freed:
        assert time.time() < deadline, "the server never logged the end of mallory's stream"
        time.sleep(0.05)
    again = RawStream(server.channel("mallory-long"))
    assert again.send(encode(Kind.OPEN, "long", 0, text=open_text(token, server.fingerprint), code=REJOIN)).kind \
        == Kind.REPLY
    lost = again.send(encode(Kind.BACKWARD, "long", 3, {"grad": torch.ones(4, server.max_length, server.hidden)},
                             text=token))
    assert (lost.kind, lost.code) == (Kind.ERROR, ErrorCode.STATE_LOST)
    assert again.send(encode(Kind.CLOSE, "long", 0, text=token)).kind == Kind.REPLY
    again.end()


def test_activation_memory_is_returned_when_the_stream_ends(server: Server) -> None:
    """Valid forwards whose backward never comes: their memory must not outlive the attacker's stream."""
    mallory = RawStream(server.channel("mallory-memory"))
    before = server.rss()
    for s in range(4):
        token = session_token()
        assert mallory.send(encode(Kind.OPEN, f"m{s}", 0, text=open_text(token, server.fingerprint))).kind \
            == Kind.REPLY
        for step in range(1, 5):  # the body keeps 4 pending forwards per session
            frame = encode(Kind.FORWARD, f"m{s}", step, _forward(server.hidden, 64, server.max_length), text=token)
            assert mallory.send(frame).kind == Kind.REPLY
    held = server.rss() - before
    mallory.end()
    deadline, left = time.monotonic() + 5, held
    while time.monotonic() < deadline and left > held / 4:
        time.sleep(0.2)
        left = server.rss() - before
    log.info("16 pending forwards of 64 x %d tokens held %.0f MB; %.0f MB after the stream ended",
             server.max_length, held / 1e6, left / 1e6)
    assert held > 100e6 and left < held / 4


def test_idle_streams_do_not_shut_other_clients_out(server: Server) -> None:
    """The idle streams: mallory opens 20 streams and sends nothing (the server had 16 worker threads)."""
    channel = server.channel("mallory-idle")
    ends: list[tuple[grpc.StatusCode, str, float]] = []
    t0 = time.monotonic()

    def idle_stream() -> None:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)(
            iter(queue.SimpleQueue().get, None))  # a request iterator that never yields
        try:
            next(iter(call))
        except grpc.RpcError as exc:
            ends.append((exc.code(), exc.details() or "", time.monotonic() - t0))

    threads = [threading.Thread(target=idle_stream, daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    refused = [e for e in ends if e[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) == 18, ends  # all but the two streams one identity may hold
    assert any("split.max_streams_per_identity" in e[1] for e in refused), refused
    with server.body("alice") as alice:
        started = time.monotonic()
        _train(server, alice, "busy-day")
        assert time.monotonic() - started < 5.0 and alice.stats.retries == 0
    for t in threads:
        t.join(IDLE + 8)
    idle = [e for e in ends if e[0] == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(idle) == 2 and all("split.idle_timeout" in e[1] and e[2] >= IDLE * 0.9 for e in idle), ends
    channel.close()


def test_a_session_flood_is_capped_per_identity_and_expires(server: Server) -> None:
    """The session flood: mallory opens 300 sessions with distinct ids on one stream."""
    mallory = RawStream(server.channel("mallory-flood"))
    token = session_token()
    answers = [mallory.send(encode(Kind.OPEN, f"id-{i}", 0, text=open_text(token, server.fingerprint)))
               for i in range(300)]
    assert [a.kind for a in answers[:4]] == [Kind.REPLY] * 4
    assert all((a.kind, a.code) == (Kind.ERROR, ErrorCode.LIMIT) for a in answers[4:])
    assert "split.max_sessions_per_identity" in answers[4].text
    with server.body("alice") as alice:  # other identities are served
        _train(server, alice, "flooded")
    mallory.end()  # mallory's sessions stay rejoinable for split.idle_timeout, then the server forgets them
    time.sleep(IDLE)
    deadline = time.monotonic() + IDLE + 3
    again = RawStream(server.channel("mallory-flood"))
    opened = 0
    while opened < 4 and time.monotonic() < deadline:
        answer = again.send(encode(Kind.OPEN, f"later-{opened}", 0, text=open_text(token, server.fingerprint)))
        if answer.kind == Kind.REPLY:
            opened += 1
        else:
            assert answer.code == ErrorCode.LIMIT
            time.sleep(0.2)
    assert opened == 4  # the flood's sessions expired
    again.end()


def test_the_client_reports_a_refusal_clearly(server: Server) -> None:
    """An honest client that hits a limit gets a SplitError naming the key, not a hang or a retry storm."""
    with server.body("alice") as alice:
        alice.open("big", server.fingerprint)
        with pytest.raises(SplitError, match="split.max_frame_tokens"):
            alice.forward("big", 1, _forward(server.hidden, 100, 48))
        alice.close("big")


def test_cli_client_cert_signs_an_identity_with_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fedpeft import cli

    assert cli.main(["certs", "--host", "localhost", "--out", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    assert cli.main(["client-cert", "--ca-dir", str(tmp_path / "ca"), "--name", "hospital-a",
                     "--out", str(tmp_path / "client")]) == 0
    paths = json.loads(capsys.readouterr().out)
    cert = x509.load_pem_x509_certificate(Path(paths["cert"]).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert oct(Path(paths["key"]).stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    argv = ["client-cert", "--ca-dir", str(tmp_path / "ca"), "--name", "hospital-a", "--out", str(tmp_path / "client")]
    assert cli.main(argv) == 2  # refuses to overwrite
    assert cli.main([*argv[:4], "bad/name"]) == 2
    assert cli.main(["client-cert", "--ca-dir", str(tmp_path / "nowhere"), "--name", "x"]) == 2
