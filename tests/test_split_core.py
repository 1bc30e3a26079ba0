"""Split-learning core: the model cut, the in-process body server and the split client.

The central check: split training over an in-process :class:`BodyServer` equals the project's
monolithic :func:`fedpeft.training.train_local` bit for bit in fp32 (same seed, LoRA init, batches,
optimizer; dropout on) for tiny BERT classification and tiny GPT-2 / LLaMA causal LM.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedpeft import data, models
from fedpeft.config import AdapterSection, DataSection, ModelSection, TrainSection
from fedpeft.errors import SplitError
from fedpeft.split.body import BodyServer
from fedpeft.split.client import SplitClient, SplitOptions, check_wire, el2n_scores, top_fraction, wire_bytes
from fedpeft.split.cut import SplitModel, cut_model
from fedpeft.split.service import BodyService, Tensors
from fedpeft.training import train_local

from conftest import write_classification, write_qa

torch.set_num_threads(1)
CPU = torch.device("cpu")
SEED = 5


def _train_cfg(**kw: object) -> TrainSection:
    # fp32 on both sides: split learning has no autocast, so the monolithic reference must not use the default
    # train.precision (auto: bf16 on a CPU with native bf16) either
    base = {"local_steps": 4, "batch_size": 4, "lr": 0.03, "max_grad_norm": 0.0, "eval_batch_size": 16,
            "precision": "fp32"}
    base.update(kw)
    return TrainSection(**base)  # type: ignore[arg-type]


def _data(tmp: Path, task: str, n: int = 24) -> tuple[torch.utils.data.Dataset, data.Collator]:
    path = write_classification(tmp / "c.jsonl", n=n) if task == "classification" else write_qa(tmp / "q.jsonl", n=n)
    ex = data.load_examples(DataSection(source="file", path=str(path)), task)
    tok = models.byte_tokenizer()
    return data.tokenize(ex, tok, 24, task), data.Collator(tok.pad_token_id, task)


def _peft(name: str, task: str, adapter: str = "lora", layers: int = 4) -> torch.nn.Module:
    mc = ModelSection(name=name, task=task, tiny_hidden_size=32, tiny_layers=layers, max_length=24)
    base = models.load_base_model(mc, num_labels=3, seed=0)
    return models.build_peft_model(base, AdapterSection(type=adapter, r=4, num_virtual_tokens=3), task, seed=0)


def _split(name: str, task: str, front: int = 1, back: int = 1, **kw: object) -> SplitModel:
    return cut_model(_peft(name, task, **kw), task, front, back)  # type: ignore[arg-type]


class Tap:
    """A BodyService in front of another that records every call (what would cross the wire)."""

    def __init__(self, inner: BodyService) -> None:
        self.inner, self.calls = inner, []  # type: ignore[var-annotated]

    def open(self, client_id: str, fingerprint: str) -> None:
        self.calls.append(("open", client_id, fingerprint))
        self.inner.open(client_id, fingerprint)

    def forward(self, client_id: str, step: int, tensors: Tensors) -> Tensors:
        self.calls.append(("forward", step, {k: v.clone() for k, v in tensors.items()}))
        return self.inner.forward(client_id, step, tensors)

    def backward(self, client_id: str, step: int, tensors: Tensors) -> Tensors:
        self.calls.append(("backward", step, {k: v.clone() for k, v in tensors.items()}))
        return self.inner.backward(client_id, step, tensors)

    def close(self, client_id: str) -> None:
        self.calls.append(("close", client_id))
        self.inner.close(client_id)


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("name,task", [("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm"),
                                       ("tiny-llama", "causal_lm")])
def test_split_training_equals_monolithic_bit_for_bit(name: str, task: str, tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, task)
    cfg = _train_cfg()
    mono = _peft(name, task)
    before = models.adapter_state(mono)
    train_local(mono, ds, collate, cfg, CPU, seed=SEED)
    expected = models.adapter_state(mono)

    split = _split(name, task, front=1, back=1)
    server = BodyServer.from_split(split, cfg)
    client = SplitClient(split, server, "c0", cfg)
    result = client.train(ds, collate, seed=SEED)
    got = {**split.client_state(), **server.adapter_state("c0")}

    assert got.keys() == expected.keys()
    assert split.client_state().keys().isdisjoint(server.adapter_state("c0").keys())
    changed = [k for k in expected if not torch.equal(before[k], expected[k])]
    assert len(changed) == len(expected)  # every adapter tensor trained (so equality means something)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:2]}"
    assert result.steps == 4 and result.bytes_sent > 0 and len(result.step_bytes) == 4


def test_split_equals_monolithic_with_cut_at_the_edges_and_sgd(tmp_path: Path) -> None:
    """front_layers = 0 (embeddings only) and a body that ends just before the last block, SGD, clipping off."""
    ds, collate = _data(tmp_path, "causal_lm")
    cfg = _train_cfg(optimizer="sgd", lr=0.5)
    mono = _peft("tiny-llama", "causal_lm", layers=3)
    train_local(mono, ds, collate, cfg, CPU, seed=SEED)
    split = _split("tiny-llama", "causal_lm", front=0, back=2, layers=3)
    server = BodyServer.from_split(split, cfg)
    SplitClient(split, server, "c0", cfg).train(ds, collate, seed=SEED)
    got = {**split.client_state(), **server.adapter_state("c0")}
    assert all(torch.equal(got[k], v) for k, v in models.adapter_state(mono).items())


def test_soft_prompt_lives_on_the_client_and_trains_exactly(tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, "causal_lm")
    cfg = _train_cfg()
    mono = _peft("tiny-gpt2", "causal_lm", adapter="prompt")
    train_local(mono, ds, collate, cfg, CPU, seed=SEED)
    split = _split("tiny-gpt2", "causal_lm", adapter="prompt")
    server = BodyServer.from_split(split, cfg)
    SplitClient(split, server, "c0", cfg).train(ds, collate, seed=SEED)
    assert server.adapter_state("c0") == {}
    expected = models.adapter_state(mono)
    assert split.client_state().keys() == expected.keys()
    assert all(torch.equal(split.client_state()[k], v) for k, v in expected.items())


def test_cut_rejects_impossible_cuts() -> None:
    pm = _peft("tiny-bert", "classification", layers=2)
    with pytest.raises(SplitError, match="at least one block"):
        cut_model(pm, "classification", 1, 1)
    with pytest.raises(SplitError, match="at least one block"):
        cut_model(pm, "classification", -1, 0)


# ------------------------------------------------------------------------------ server adapters

def _batch(tmp: Path, task: str = "classification", n: int = 4) -> dict[str, torch.Tensor]:
    ds, collate = _data(tmp, task)
    return collate([ds[i] for i in range(n)])


def _no_dropout(split: SplitModel) -> SplitModel:
    for m in split.peft_model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return split


def test_per_client_adapters_are_independent_and_shared_ones_are_one_set(tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, "classification")
    cfg = _train_cfg(local_steps=2)
    split = _split("tiny-bert", "classification")
    init = split.server_state()

    per = BodyServer.from_split(split, cfg, "per_client")
    SplitClient(split, per, "a", cfg).train(ds, collate, seed=1)
    a_after_a = per.adapter_state("a")
    SplitClient(split, per, "b", cfg).train(ds, collate, seed=2)
    assert all(torch.equal(per.adapter_state("a")[k], v) for k, v in a_after_a.items())  # b did not touch a's
    assert not all(torch.equal(per.adapter_state("b")[k], v) for k, v in a_after_a.items())
    assert all(torch.equal(split.server_state()[k], v) for k, v in init.items())  # the template is never trained
    with pytest.raises(SplitError, match="name the client"):
        per.adapter_state()

    split2 = _split("tiny-bert", "classification")
    shared = BodyServer.from_split(split2, cfg, "shared")
    SplitClient(split2, shared, "a", cfg).train(ds, collate, seed=1)
    assert all(torch.equal(shared.adapter_state("b")[k], v) for k, v in a_after_a.items())  # same start, same steps
    SplitClient(split2, shared, "b", cfg).train(ds, collate, seed=2)
    assert all(torch.equal(shared.adapter_state("a")[k], shared.adapter_state()[k]) for k in init)
    # b continued from a's adapters: not what a fresh per-client set of b reached
    assert not all(torch.equal(shared.adapter_state()[k], v) for k, v in per.adapter_state("b").items())


def test_shared_adapters_recompute_a_stale_graph(tmp_path: Path) -> None:
    """Interleaved clients on shared adapters: b's graph predates a's update, so b's backward recomputes it
    and returns the gradient of the *current* body (what a fresh forward + backward would give)."""
    cfg = _train_cfg()
    split = _no_dropout(_split("tiny-gpt2", "causal_lm"))
    batch = _batch(tmp_path, "causal_lm")
    h, m = split.front(batch["input_ids"], batch["attention_mask"])
    msg = {"hidden": h.detach(), "attention_mask": m}
    server = BodyServer.from_split(split, cfg, "shared")
    for cid in ("a", "b"):
        server.open(cid, split.fingerprint)
    out_a = server.forward("a", 1, msg)["hidden"]
    server.forward("b", 1, msg)
    g = torch.randn_like(out_a)
    server.backward("a", 1, {"grad": g})
    grad_b = server.backward("b", 1, {"grad": g})["grad"]

    ref = BodyServer.from_split(split, cfg, "shared")  # same start: a's step, then a fresh step for b
    ref.open("x", split.fingerprint)
    ref.forward("x", 1, msg)
    ref.backward("x", 1, {"grad": g})
    ref.forward("x", 2, msg)
    assert torch.equal(ref.backward("x", 2, {"grad": g})["grad"], grad_b)
    assert all(torch.equal(ref.adapter_state()[k], v) for k, v in server.adapter_state().items())


def test_per_client_sessions_run_in_parallel_threads_with_sequential_results(tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, "classification")
    cfg = _train_cfg(local_steps=3)

    def run(parallel: bool) -> dict[str, dict[str, torch.Tensor]]:
        splits = {c: _no_dropout(_split("tiny-bert", "classification")) for c in "ab"}
        server = BodyServer.from_split(splits["a"], cfg, "per_client")
        clients = {c: SplitClient(splits[c], server, c, cfg) for c in "ab"}
        jobs = [threading.Thread(target=clients[c].train, args=(ds, collate, i)) for i, c in enumerate("ab")]
        for j in jobs:
            j.start()
            if not parallel:
                j.join()
        for j in jobs:
            j.join()
        return {c: {**splits[c].client_state(), **server.adapter_state(c)} for c in "ab"}

    seq, par = run(False), run(True)
    for c in "ab":
        assert all(torch.equal(par[c][k], v) for k, v in seq[c].items())


# ------------------------------------------------------------------------------ client options

def test_activation_noise_changes_what_is_sent_not_its_size(tmp_path: Path) -> None:
    from fedpeft.split import frames

    ds, collate = _data(tmp_path, "classification")
    cfg = _train_cfg(local_steps=1)
    sent = {}
    for std in (0.0, 0.5):
        split = _no_dropout(_split("tiny-bert", "classification"))
        tap = Tap(BodyServer.from_split(split, cfg))
        client = SplitClient(split, tap, "c", cfg, SplitOptions(activation_noise=std))
        result = client.train(ds, collate, seed=3)
        fwd = next(c[2] for c in tap.calls if c[0] == "forward")
        sent[std] = (fwd["hidden"], result)
    clean, noisy = sent[0.0][0], sent[0.5][0]
    assert not torch.equal(clean, noisy)
    assert abs(float((noisy - clean).std()) - 0.5) < 0.05
    # the byte accounting is the size of the real frames: noise adds no bytes, a bf16 wire halves activations
    assert sent[0.0][1].bytes_sent == sent[0.5][1].bytes_sent
    h = sent[0.0][0]
    m = torch.ones(h.shape[:2], dtype=torch.long)
    exact = len(frames.encode(frames.Kind.FORWARD, "c", 1, {"hidden": h, "attention_mask": m}))
    assert wire_bytes({"hidden": h, "attention_mask": m}, None, "c") == exact
    bf16 = wire_bytes({"hidden": h, "attention_mask": m}, "bf16", "c")
    assert bf16 == exact - 2 * h.numel()


def test_byte_accounting_equals_the_encoded_frames(tmp_path: Path) -> None:
    from fedpeft.split import frames

    ds, collate = _data(tmp_path, "causal_lm")
    cfg = _train_cfg(local_steps=2)
    split = _split("tiny-gpt2", "causal_lm")
    tap = Tap(BodyServer.from_split(split, cfg))
    result = SplitClient(split, tap, "c", cfg).train(ds, collate, seed=3)
    token = frames.session_token()  # a request carries its session token
    sizes = [len(frames.encode(frames.Kind.FORWARD if c[0] == "forward" else frames.Kind.BACKWARD, "c", c[1], c[2],
                               text=token))
             for c in tap.calls if c[0] in ("forward", "backward")]
    assert result.bytes_sent == sum(sizes)
    assert [b.sent for b in result.step_bytes] == [sizes[0] + sizes[1], sizes[2] + sizes[3]]
    assert result.bytes_received > 0


def test_local_loss_steps_make_no_service_calls(tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, "classification")
    cfg = _train_cfg(local_steps=2)
    split = _split("tiny-bert", "classification")
    tap = Tap(BodyServer.from_split(split, cfg))
    client = SplitClient(split, tap, "c", cfg, SplitOptions(local_loss_steps=3))
    client.train(ds, collate, seed=1)
    kinds = [c[0] for c in tap.calls]
    assert kinds == ["open", "forward", "backward", "forward", "backward", "close"]

    # the local steps did train the client side: compare with the same run without them
    split2 = _split("tiny-bert", "classification")
    server2 = BodyServer.from_split(split2, cfg)
    SplitClient(split2, server2, "c", cfg).train(ds, collate, seed=1)
    assert all(torch.equal(server2.adapter_state("c")[k], v) for k, v in tap.inner.adapter_state("c").items())
    assert not all(torch.equal(split2.client_state()[k], v) for k, v in split.client_state().items())

    # only local steps: the service is opened and closed, never called
    tap.calls.clear()
    before = split.client_state()
    client.local_step(collate([ds[0], ds[1]]), torch.optim.SGD(split.client_parameters().values(), 0.1))
    assert tap.calls == []
    assert not all(torch.equal(split.client_state()[k], v) for k, v in before.items())


def test_el2n_scores_and_pruning_keep_the_highest_scores(tmp_path: Path) -> None:
    from fedpeft.split.client import el2n, prune_el2n

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    p = logits.softmax(-1)
    manual = torch.stack([(p[i] - torch.nn.functional.one_hot(labels[i], 3)).norm() for i in range(3)])
    assert torch.allclose(el2n(logits, labels, "classification"), manual)

    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8])
    assert top_fraction(scores, 0.5).tolist() == [1, 3, 5, 7]
    assert top_fraction(scores, 0.3).tolist() == [1, 3, 7]      # ceil(2.4) = 3; the tie at 0.9 keeps both
    assert top_fraction(scores, 1.0).tolist() == list(range(8))
    with pytest.raises(SplitError):
        top_fraction(scores, 0.0)

    ds, collate = _data(tmp_path, "causal_lm", n=30)
    split = _split("tiny-llama", "causal_lm")
    s = el2n_scores(split, ds, collate, batch_size=7)
    assert s.shape == (30,) and bool((s > 0).all())
    kept = prune_el2n(split, ds, collate, 0.4, batch_size=7)
    assert len(kept) == 12
    assert sorted(s[kept.indices].tolist()) == sorted(s.sort(descending=True).values[:12].tolist())
    assert float(s[kept.indices].min()) >= float(s.sort(descending=True).values[11])

    tap = Tap(BodyServer.from_split(split, _train_cfg()))
    result = SplitClient(split, tap, "c", _train_cfg(local_steps=1), SplitOptions(prune_fraction=0.6)).train(
        ds, collate, seed=0)
    assert result.kept_examples == 12 and result.num_examples == 12
    assert [c[0] for c in tap.calls] == ["open", "forward", "backward", "close"]  # scoring calls no server


# ------------------------------------------------------------------------------ the wire

def test_only_activations_mask_and_gradients_cross(tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, "causal_lm")
    cfg = _train_cfg(local_steps=2, batch_size=len(ds))
    split = _split("tiny-gpt2", "causal_lm")
    tap = Tap(BodyServer.from_split(split, cfg))
    SplitClient(split, tap, "c", cfg).train(ds, collate, seed=0)
    batch = collate([ds[i] for i in range(len(ds))])
    for call in tap.calls:
        if call[0] == "forward":
            assert set(call[2]) == {"hidden", "attention_mask"}
        elif call[0] == "backward":
            assert set(call[2]) == {"grad"}
        else:
            continue
        for name, t in call[2].items():
            if name != "attention_mask":
                assert t.is_floating_point() and t.shape[-1] == 32  # hidden size, not the vocabulary (logits)
            for secret in (batch["input_ids"], batch["labels"]):
                assert t.shape != secret.shape or name == "attention_mask"
        mask = call[2].get("attention_mask")
        if mask is not None:
            assert set(mask.unique().tolist()) <= {0, 1}

    h = torch.zeros(2, 5, 32)
    check_wire("forward", {"hidden": h, "attention_mask": torch.ones(2, 5)})
    check_wire("backward", {"grad": h})
    bad = [("forward", {"hidden": h, "attention_mask": torch.ones(2, 5), "input_ids": torch.ones(2, 5)}),
           ("forward", {"hidden": h, "labels": torch.ones(2, 5)}),
           ("backward", {"grad": h, "logits": h}),
           ("forward", {"hidden": torch.ones(2, 5, 32, dtype=torch.long), "attention_mask": torch.ones(2, 5)}),
           ("forward", {"hidden": h, "attention_mask": torch.full((2, 5), 7)}),
           ("update", {"grad": h})]
    for kind, tensors in bad:
        with pytest.raises(SplitError):
            check_wire(kind, tensors)


# ------------------------------------------------------------------------------ protocol misuse

def test_protocol_misuse_raises_split_error(tmp_path: Path) -> None:
    split = _split("tiny-bert", "classification")
    server = BodyServer.from_split(split, _train_cfg())
    batch = _batch(tmp_path)
    h, m = split.front(batch["input_ids"], batch["attention_mask"])
    msg = {"hidden": h.detach(), "attention_mask": m}
    with pytest.raises(SplitError, match="without an open session"):
        server.forward("c", 1, msg)
    with pytest.raises(SplitError, match="fingerprint"):
        server.open("c", split.fingerprint + "x")
    assert _split("tiny-bert", "classification", front=2).fingerprint != split.fingerprint
    server.open("c", split.fingerprint)
    with pytest.raises(SplitError, match="without a forward"):
        server.backward("c", 1, {"grad": h.detach()})
    with pytest.raises(SplitError, match="exactly 'hidden'"):
        server.forward("c", 1, {**msg, "labels": batch["labels"]})
    with pytest.raises(SplitError, match=r"\[B, T, 32\]"):
        server.forward("c", 1, {"hidden": h.detach()[..., :16], "attention_mask": m})
    with pytest.raises(SplitError, match=r"\[B, T, 32\]"):
        server.forward("c", 1, {"hidden": h.detach(), "attention_mask": m[:, :3]})
    out = server.forward("c", 1, msg)["hidden"]
    with pytest.raises(SplitError, match="steps \\[1\\]"):
        server.backward("c", 2, {"grad": out})
    with pytest.raises(SplitError, match="shape"):
        server.backward("c", 1, {"grad": out[:, :2]})
    with pytest.raises(SplitError, match="exactly 'grad'"):
        server.backward("c", 1, {"grad": out, "x": out})
    server.backward("c", 1, {"grad": torch.ones_like(out)})
    with pytest.raises(SplitError, match="already"):
        server.forward("c", 1, msg)
    server.close("c")
    with pytest.raises(SplitError, match="without an open session"):
        server.backward("c", 2, {"grad": out})
    with pytest.raises(SplitError, match="server_adapters"):
        BodyServer.from_split(split, _train_cfg(), "global")


# ------------------------------------------------------------------------------ persistence

def test_save_and_load_resume_the_body_exactly(tmp_path: Path) -> None:
    ds, collate = _data(tmp_path, "classification")
    cfg = _train_cfg(local_steps=2)

    def rounds(restart: bool, mode: str) -> dict[str, torch.Tensor]:
        split = _split("tiny-bert", "classification")
        server = BodyServer.from_split(split, cfg, mode)
        client = SplitClient(split, server, "c", cfg)
        client.train(ds, collate, seed=1)
        if restart:
            server.save(tmp_path / mode)
            server = BodyServer.from_split(_split("tiny-bert", "classification"), cfg, mode)  # a new process
            server.load(tmp_path / mode)
            client.service = server
        client.train(ds, collate, seed=2)
        return {**split.client_state(), **server.adapter_state("c")}

    for mode in ("per_client", "shared"):
        straight, resumed = rounds(False, mode), rounds(True, mode)
        assert all(torch.equal(resumed[k], v) for k, v in straight.items())
    files = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert files == ["body.json", "body.safetensors"]

    other = BodyServer.from_split(_split("tiny-bert", "classification", front=2), cfg, "shared")
    with pytest.raises(SplitError, match="saved split body state"):
        other.load(tmp_path / "shared")
    with pytest.raises(SplitError, match="cannot read"):
        other.load(tmp_path / "missing")


def test_split_over_grpc_on_loopback_equals_in_process(tmp_path: Path) -> None:
    """The same training through ``split.server`` + ``GrpcBody`` (real gRPC, in this process) is bit-identical;
    the body state is saved by the server as it goes."""
    from fedpeft.split.server import serve
    from fedpeft.split.transport import GrpcBody

    ds, collate = _data(tmp_path, "causal_lm")
    cfg = _train_cfg()
    states = []
    for over_grpc in (False, True):
        split = _split("tiny-gpt2", "causal_lm")
        body = BodyServer.from_split(split, cfg)
        if over_grpc:
            server = serve(body, port=0, state_dir=tmp_path / "state", save_every=2)
            with GrpcBody(server.address) as proxy:
                result = SplitClient(split, proxy, "c0", cfg).train(ds, collate, seed=SEED)
                fwd_bwd = sum(proxy.stats.by_kind[k][0] for k in ("forward", "backward"))
            server.stop()
            assert result.bytes_sent == fwd_bwd  # the accounting equals the frames gRPC carried
            assert (tmp_path / "state" / "current" / "body" / "body.safetensors").exists()
        else:
            SplitClient(split, body, "c0", cfg).train(ds, collate, seed=SEED)
        states.append({**split.client_state(), **body.adapter_state("c0")})
    assert all(torch.equal(states[1][k], v) for k, v in states[0].items())


# ------------------------------------------------------------------------------ SplitFed glue (phase 2)

def test_splitfed_rounds_from_a_config(tiny_cfg) -> None:  # noqa: ANN001 - conftest factory
    from fedpeft.config import ConfigError
    from fedpeft.runtime import Runtime
    from fedpeft.split.federated import cut_for, make_service, train_split_round

    cfg = tiny_cfg(**{"split.enabled": True, "model.tiny_layers": 3, "model.tiny_hidden_size": 32,
                      "train.local_steps": 2, "train.max_grad_norm": 0.0, "split.local_loss_steps": 1,
                      "split.prune_fraction": 0.5})
    rt = Runtime(cfg)
    split = cut_for(cfg, rt.model)
    service = make_service(cfg, split)
    assert isinstance(service, BodyServer)
    global_state = rt.initial_adapter()
    client_keys = set(split.client_parameters())
    for rnd in range(2):
        replies = [train_split_round(cfg, split, service, f"c{i}", rt.client_dataset(i), rt.collate, global_state,
                                     seed=100 * rnd + i) for i in range(2)]
        total = sum(r.num_examples for r in replies)
        new = {k: sum(r.state[k] * (r.num_examples / total) for r in replies) for k in client_keys}
        assert not all(torch.equal(new[k], global_state[k]) for k in client_keys)
        global_state = {**global_state, **new}
    m = replies[0].metrics
    assert m["split_steps"] == 2 and m["split_local_steps"] == 1 and m["split_bytes_up"] > 0
    assert m["split_kept_examples"] == -(-len(rt.client_dataset(0)) // 2)
    assert m["fl_adapter_bytes_fp32"] > m["split_client_adapter_bytes"] > 0
    assert not all(torch.equal(service.adapter_state("c0")[k], v) for k, v in service.adapter_state("c1").items())

    with pytest.raises(ConfigError, match="no block for the server"):
        tiny_cfg(**{"split.enabled": True, "model.tiny_layers": 2})
    with pytest.raises(ConfigError, match="prefix"):
        tiny_cfg(**{"split.enabled": True, "model.tiny_layers": 3, "adapter.type": "prefix"})
