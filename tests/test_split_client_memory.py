"""A split client whose body runs on a remote split server does not keep the body's weights.

The client process (``Runtime.split`` with ``split.address`` set) cuts the model and frees the
middle blocks; the split server builds its own full model (``split.server.build_body``). Training
through that separate server must be bit-identical to a client that keeps its body, with the same
fingerprint, names and layout, and the freed body must refuse to run with a clear ``SplitError``.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fedpeft import models
from fedpeft.config import AdapterSection, ModelSection
from fedpeft.errors import SplitError
from fedpeft.runtime import Runtime
from fedpeft.split.body import BodyServer
from fedpeft.split.cut import cut_model
from fedpeft.split.federated import train_split_round
from fedpeft.split.plugin import split_of
from fedpeft.split.server import build_body

torch.set_num_threads(1)
SPLIT = {"split.enabled": True, "model.tiny_layers": 5, "split.front_layers": 1, "split.back_layers": 1,
         "train.local_steps": 3, "train.batch_size": 4}
REMOTE = "127.0.0.1:9"  # never dialled here: the tests pass their own in-process body server


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _round(rt: Runtime, server: BodyServer) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    sr = train_split_round(rt.cfg, split_of(rt).model, server, "c0", rt.client_dataset(0), rt.collate,
                           rt.initial_adapter(), seed=11)
    return sr.state, sr.metrics


def test_remote_client_frees_the_body_and_trains_bit_identically(tiny_cfg) -> None:  # noqa: ANN001 - fixture
    keep = Runtime(tiny_cfg(**SPLIT))                              # today's client: holds the whole model
    lean = Runtime(tiny_cfg(**SPLIT, **{"split.address": REMOTE}))  # a client of a remote split server
    whole = _numel(keep.model)
    assert not split_of(keep).model.body_freed and split_of(lean).model.body_freed

    # no body parameter (or buffer) left in the client's model; the front and back are all there
    body_numel = sum(p.numel() for p in split_of(keep).model.body.layers.parameters())
    assert body_numel > 0.4 * whole
    assert _numel(lean.model) == whole - body_numel
    assert not list(split_of(lean).model.body.parameters()) and not list(split_of(lean).model.body.buffers())
    kept_names = {n for n, _ in lean.model.named_parameters()}
    body_names = {n for n, _ in keep.model.named_parameters()} - kept_names
    assert all(any(f"layer.{i}." in n for i in (1, 2, 3)) for n in body_names) and body_names
    assert not any(f"layer.{i}." in n for n in kept_names for i in (1, 2, 3))

    # what the server checks and what travels is unchanged
    servers = [build_body(tiny_cfg(**SPLIT)) for _ in range(2)]  # each from its own full model, as a split server
    assert split_of(lean).model.fingerprint == split_of(keep).model.fingerprint == servers[0].fingerprint
    assert lean.layout.names == keep.layout.names and lean.layout.total == keep.layout.total
    assert set(models.adapter_state(lean.model)) == set(split_of(lean).model.client_parameters())  # no body keys here

    kept_state, kept_metrics = _round(keep, servers[0])
    lean_state, lean_metrics = _round(lean, servers[1])
    start = keep.initial_adapter()
    assert all(not torch.equal(kept_state[k], start[k]) for k in kept_state)  # everything trained
    assert kept_state.keys() == lean_state.keys()
    assert all(torch.equal(kept_state[k], lean_state[k]) for k in kept_state)
    assert kept_metrics == {**lean_metrics, "split_seconds": kept_metrics["split_seconds"]}  # incl. fl_adapter_bytes
    body_a, body_b = servers[0].adapter_state("c0"), servers[1].adapter_state("c0")
    assert all(torch.equal(body_a[k], body_b[k]) for k in body_a)


def test_the_freed_body_refuses_to_run(tiny_cfg) -> None:  # noqa: ANN001 - fixture
    rt = Runtime(tiny_cfg(**SPLIT, **{"split.address": REMOTE}))
    split = split_of(rt).model
    hidden, mask = torch.zeros(2, 3, rt.cfg.model.tiny_hidden_size), torch.ones(2, 3)
    with pytest.raises(SplitError, match="freed the body's weights"):
        split.body(hidden, mask)
    with pytest.raises(SplitError, match="block 2 belongs to the body"):
        split.body.layers[1](hidden)
    with pytest.raises(SplitError, match="adapters are not here"):
        split.server_parameters()
    with pytest.raises(SplitError):  # an in-process body server cannot be built from it
        BodyServer.from_split(split, rt.cfg.train)
    with pytest.raises(SplitError, match="belongs to the body"):  # nor can the whole model run
        rt.model(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=mask)


def test_in_process_body_keeps_its_weights(tiny_cfg) -> None:  # noqa: ANN001 - fixture
    rt = Runtime(tiny_cfg(**SPLIT))  # empty address: the in-process body server runs on this very model
    assert not split_of(rt).model.body_freed and split_of(rt).model.server_parameters()
    assert set(rt.initial_state) == set(models.adapter_state(rt.model))


def test_free_body_releases_the_tensors() -> None:
    mc = ModelSection(name="tiny-llama", task="causal_lm", tiny_hidden_size=32, tiny_layers=4, max_length=24)
    peft = models.build_peft_model(models.load_base_model(mc, seed=0), AdapterSection(r=4), "causal_lm", seed=0)
    split = cut_model(peft, "causal_lm", 1, 1)
    body = list(split.body.layers.parameters())
    expected = sum(p.numel() * p.element_size() for p in body)
    refs = [weakref.ref(p) for p in body]
    client = split.client_parameters()
    fingerprint = split.fingerprint
    del body
    assert split.free_body() == expected and split.free_body() == 0  # idempotent
    gc.collect()
    assert all(r() is None for r in refs)  # nothing in the process still holds a body tensor
    assert split.client_parameters() == client and split.fingerprint == fingerprint
    assert [type(b).__name__ for b in split.peft_model.get_base_model().model.layers] == [
        "LlamaDecoderLayer", "_FreedBlock", "_FreedBlock", "LlamaDecoderLayer"]
