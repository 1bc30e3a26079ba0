"""Victims of the audit: where a grid cell's client comes from, and tiny victims for the attack tests.

:class:`VictimSource` (from :func:`victim_source`) is what ``fedpeft audit`` trains per cell: the
scenario's own model, tokenizer and data (``audit.victim = "scenario"``) or the byte-vocabulary tiny
causal LM on random words (``"tiny"``), with the public token prior of the frequency-guess baseline.

:func:`make_victim` builds a tiny peft model, draws private sequences, puts the global adapter in a
"first round" (B = 0) or "later round" (B ≠ 0) state, trains locally (one gradient, or a multi-step
SGD/Adam delta), optionally clips + noises and compresses it exactly like a client would, and returns
the server's :class:`Observation` together with the ground truth (which only the metrics may use).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from fedpeft import config
from fedpeft.attacks.observation import Observation, State
from fedpeft.errors import ConfigError
from fedpeft.models import adapter_state, build_peft_model, byte_tokenizer, load_base_model, set_adapter_state

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

WORDS = ("the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "park", "with", "red", "ball", "my",
         "name", "is", "john", "card", "number", "bank", "pin", "code", "we", "met", "at", "noon", "secret")


@dataclass
class Truth:
    """The client's private batch (ground truth for the metrics only)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    vocab_size: int = 261
    extra: dict = field(default_factory=dict)


def private_batch(batch_size: int, seq_len: int, seed: int, mode: str = "words",
                  vocab_size: int = 261) -> torch.Tensor:
    """Private token ids (batch × seq_len): byte-tokenized random word text, or uniform random ids."""
    g = torch.Generator().manual_seed(seed)
    if mode == "uniform":
        return torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    tok = byte_tokenizer()
    rows = []
    for _ in range(batch_size):
        ids: list[int] = []
        while len(ids) < seq_len:
            w = WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]
            ids += tok(w + " ", add_special_tokens=False)["input_ids"]
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def victim_config(model: str = "tiny-llama", adapter: str = "lora", r: int = 16, targets: str = "",
                  hidden: int = 128, task: str = "causal_lm", num_virtual_tokens: int = 8) -> config.Config:
    """The run config of a tiny victim (tiny-llama: q/k/v, tiny-gpt2: c_attn by default)."""
    targets = targets or {"tiny-llama": "q_proj,k_proj,v_proj", "tiny-gpt2": "c_attn"}.get(model, "")
    sets = [f'model.name="{model}"', f'model.task="{task}"', f"model.tiny_hidden_size={hidden}",
            f'adapter.type="{adapter}"', f"adapter.r={r}", f"adapter.num_virtual_tokens={num_virtual_tokens}",
            f'data.source="{"chatterbot" if task == "causal_lm" else "bbc_news"}"']
    if targets and adapter == "lora":
        sets.append(f'adapter.target_modules="{targets}"')
    return config.load(None, sets)


def _later_round(state: State, seed: int, scale: float) -> State:
    """A plausible trained global adapter: every tensor moved by seeded Gaussian noise (B ≠ 0)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def _loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None, task: str) -> torch.Tensor:
    if task == "classification":
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss


def local_update(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None, task: str, steps: int,
                 lr: float, optimizer: str) -> tuple[str, State]:
    """One client round on a full batch: a gradient (steps = 0) or the delta of ``steps`` optimizer steps."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if steps == 0:
        grads = torch.autograd.grad(_loss(model, ids, labels, task), list(params.values()))
        return "gradient", {n: g.detach().clone() for n, g in zip(params, grads)}
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(params.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, ids, labels, task).backward()
        opt.step()
    return "delta", {n: (p.detach() - start[n]).clone() for n, p in params.items()}


def privatize(update: State, clip: float | None, noise_multiplier: float, seed: int) -> State:
    """Clip the update to norm ``clip`` (None: its own norm) and add N(0, (z·clip)²) per coordinate."""
    from fedpeft.privacy.client_dp import clip_update, global_norm

    c = global_norm(update) if clip is None else clip
    out, _ = clip_update(update, c) if clip is not None else (dict(update), 1.0)
    if noise_multiplier > 0:
        g = torch.Generator().manual_seed(20_000 + seed)
        out = {k: v + noise_multiplier * c * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in out.items()}
    return out


def compress(update: State, codec: str, seed: int = 0) -> State:
    """Encode + decode through a :mod:`fedpeft.compression` codec (what the server decodes), by the
    clients' own pipeline (:func:`fedpeft.update.encode_update`; no error feedback: one round each)."""
    import numpy as np

    from fedpeft.compression import Layout, make_codec
    from fedpeft.update import encode_update

    f32 = {k: v.to(torch.float32) for k, v in update.items()}
    layout = Layout.from_state(f32)
    decoded = encode_update(f32, make_codec(codec), layout, rng=np.random.default_rng(seed)).sent
    return {k: decoded[k].to(update[k].dtype) for k in update}


def observe(peft_model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None,
            task: str = "causal_lm", first_round: bool = False, steps: int = 0, lr: float = 0.01,
            optimizer: str = "sgd", noise_multiplier: float = 0.0, clip: float | None = None, codec: str = "none",
            rounds: int = 1, seed: int = 0, b_scale: float = 0.05) -> Observation:
    """Simulate one client on ``ids`` with any peft model and return what the server observes.

    ``steps=0``: single-step gradient; ``steps>0``: delta of that many SGD/Adam steps. ``rounds>1``
    stacks earlier rounds of the same client on the same data (different global adapters) into
    ``Observation.history``. The model's dtype is kept (use float64 for the exact-decoding regime).
    """
    peft_model.eval()  # no dropout: the tiny models have dropout layers
    dtype = next(p for p in peft_model.parameters() if p.requires_grad).dtype
    init = adapter_state(peft_model)
    pairs: list[tuple[State, State]] = []
    kind = "gradient"
    for rnd in range(rounds):
        fresh = first_round and rnd == 0 and rounds == 1
        g_state = init if fresh else _later_round(init, seed * 100 + rnd, b_scale)
        g_state = {k: v.to(dtype) for k, v in g_state.items()}
        set_adapter_state(peft_model, g_state)
        with torch.enable_grad():
            kind, upd = local_update(peft_model, ids, labels, task, steps, lr, optimizer)
        upd = privatize(upd, clip, noise_multiplier, seed * 100 + rnd) if noise_multiplier or clip else upd
        upd = compress(upd, codec, seed) if codec != "none" else upd
        pairs.append((g_state, upd))
    set_adapter_state(peft_model, pairs[-1][0])
    return Observation(model=peft_model, global_state=pairs[-1][0], update=pairs[-1][1], kind=kind,
                       history=pairs[:-1], batch_size=ids.shape[0], num_examples=ids.shape[0], seq_len=ids.shape[1],
                       local_steps=max(1, steps), lr=lr, optimizer=optimizer, task=task)


def make_victim(model: str = "tiny-llama", adapter: str = "lora", r: int = 16, targets: str = "",
                hidden: int = 128, batch_size: int = 2, seq_len: int = 16, float64: bool = False,
                text: str = "words", task: str = "causal_lm", num_labels: int = 4, seed: int = 0,
                **round_kw: object) -> tuple[Observation, Truth]:
    """A tiny victim client's observation and private truth; ``round_kw`` go to :func:`observe`
    (first_round, steps, lr, optimizer, noise_multiplier, clip, codec, rounds, b_scale)."""
    cfg = victim_config(model, adapter, r, targets, hidden, task)
    base = load_base_model(cfg.model, num_labels=num_labels, seed=seed % 3)
    peft_model = build_peft_model(base, cfg.adapter, task, seed=seed)
    peft_model = peft_model.to(torch.float64 if float64 else torch.float32)
    ids = private_batch(batch_size, seq_len, seed, text)
    labels = torch.randint(num_labels, (batch_size,), generator=torch.Generator().manual_seed(seed)) \
        if task == "classification" else None
    obs = observe(peft_model, ids, labels, task, seed=seed, **round_kw)  # type: ignore[arg-type]
    return obs, Truth(ids, labels, vocab_size=peft_model.get_input_embeddings().num_embeddings)


@dataclass
class VictimSource:
    """Where an audit cell's victim comes from (``audit.victim``).

    ``scenario``: the scenario's base model and tokenizer; private batches are real examples of the
    scenario's data source, truncated to ``audit.seq_len`` tokens. ``tiny``: the byte-vocabulary tiny
    causal LM on random words (fast; for tests). ``prior`` counts tokens of *public* text disjoint from
    every private batch (the baseline attacker's guess: the most frequent tokens).
    """

    kind: str
    model: config.ModelSection
    task: str
    num_labels: int
    prior: torch.Tensor
    prior_text: str
    rows: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    base: torch.nn.Module | None = None
    public_docs: int = 0
    candidates: dict[str, dict] = field(default_factory=dict)  #: per target set: the span attacks' token inputs

    def batch(self, batch_size: int, seq_len: int, seed: int, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A private batch (ids batch × seq_len, and class labels for classification)."""
        if self.kind == "tiny":
            return private_batch(batch_size, seq_len, seed, text), None
        if batch_size > len(self.rows):
            raise ConfigError(f"audit: batch_size {batch_size} exceeds the {len(self.rows)} private examples "
                                     f"of at least {seq_len} tokens in data.source {self.prior_text!r}")
        pick = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
        ids = torch.tensor([self.rows[i] for i in pick])
        return ids, torch.tensor([self.labels[i] for i in pick]) if self.task == "classification" else None

    def describe(self) -> str:
        """One line for the report: which model, which private text, which prior."""
        vocab = self.prior.numel()
        if self.kind == "tiny":
            return (f"tiny causal LM `{self.model.name}` (hidden {self.model.tiny_hidden_size}, byte vocabulary of "
                    f"{vocab}) on {self.prior_text}; baseline prior: token frequencies of held-out text of the "
                    "same generator")
        return (f"the scenario's model `{self.model.name}` ({self.task}, vocabulary {vocab}) on examples of "
                f"`{self.prior_text}` ({len(self.rows)} in the private pool); baseline prior: token frequencies of "
                f"{self.public_docs} other documents of the same source, disjoint from every private batch")

    def alphabet(self) -> list[int]:
        """Public canary format: the tokens that occur in the public text."""
        return self.prior.nonzero().flatten().tolist()


def _counts(rows: list[list[int]], vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab)
    for r in rows:
        counts += torch.bincount(torch.tensor(r, dtype=torch.long), minlength=vocab)[:vocab].float()
    return counts


def victim_source(cfg: config.Config, public_docs: int = 1000) -> VictimSource:
    """Load the victim's model config, private example pool and public token prior once per audit.

    Scenario victims: the scenario's examples are split in two halves by a seeded permutation; the
    first (at most ``public_docs`` documents, tokenized up to ``model.max_length``) gives the prior, the
    second is the private pool. Both come from the scenario's own data (the text a client trains on):
    the prior is what an attacker who knows the domain would guess, without the client's examples.
    """
    a = cfg.audit
    if a.victim == "tiny":
        name = cfg.model.name if cfg.model.name in ("tiny-llama", "tiny-gpt2") else "tiny-llama"
        vcfg = victim_config(name, "lora", hidden=cfg.model.tiny_hidden_size)
        vocab = len(byte_tokenizer())
        public = private_batch(256, a.seq_len, 987_654_321, a.text).tolist()  # held-out draws of the same text
        return VictimSource("tiny", vcfg.model, "causal_lm", 0, _counts(public, vocab), f"random {a.text}")
    import numpy as np

    from fedpeft.models import load_tokenizer
    from fedpeft.sources import load_examples

    task = cfg.model.task
    ex = load_examples(cfg.data, task, seed=cfg.run.seed)
    tok = load_tokenizer(cfg.model)
    order = np.random.default_rng(cfg.run.seed).permutation(len(ex))
    half = len(ex) // 2
    public_ids = tok([ex.texts[i] for i in order[:half][:public_docs]], truncation=True,
                     max_length=cfg.model.max_length)["input_ids"]
    private_idx = order[half:]
    enc = tok([ex.texts[i] for i in private_idx], truncation=True, max_length=a.seq_len)["input_ids"]
    keep = [j for j, ids in enumerate(enc) if len(ids) == a.seq_len]  # no padding: every position is a token
    base = load_base_model(cfg.model, num_labels=ex.num_labels, seed=cfg.run.seed)
    vocab = int(cast(torch.nn.Embedding, cast("PreTrainedModel", base).get_input_embeddings()).num_embeddings)
    log.info("audit victim: %s, %d private examples of >= %d tokens, prior from %d public documents",
             cfg.model.name, len(keep), a.seq_len, len(public_ids))
    return VictimSource("scenario", cfg.model, task, ex.num_labels, _counts(public_ids, vocab), cfg.data.source,
                        rows=[enc[j] for j in keep], labels=[int(ex.labels[private_idx[j]]) for j in keep], base=base,
                        public_docs=len(public_ids))
