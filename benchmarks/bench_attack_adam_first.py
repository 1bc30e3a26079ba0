"""Why ``sign_span`` reads less of a first-round AdamW update: which tokens it misses, and why.

Usage: ``python benchmarks/bench_attack_adam_first.py [--seeds 6] [--no-append]``

Victim: ``tests/plain_victims.py::adamw_victim("llama", ...)``, first round (LoRA B = 0), five torch AdamW
steps (lr 1e-3, weight decay 0.01), one English sentence of 16 WordPiece tokens, as in
``bench_attack_adam.py``. Per seed:

* ``bag F1``: ``sign_span`` as it runs by default (``fit="auto"``: the signs in a first round).
* ``picks``: its pursuit run on without the floor to 16 picks, T / F per pick from the 9th on (right /
  wrong token) and the fraction of signs left unexplained when the first wrong token came.
* ``ceiling``: the bag F1 of the picks before the first wrong one (the best any stopping rule can do on
  this pick order).
* ``missed``: the sentence's tokens that no pick before the first wrong one found, and their positions.
* ``weight first / later``: each token's weight in the first-block dL/dA rows, ‖Bᵀ δ_t‖ ‖x_t‖ over q/k/v
  (δ_t: the loss gradient at the module's output for token t), the missed tokens' median over the found
  tokens' median: with the B of the client's second step (first round: B₁ = −lr sign(dL/dB), the only B
  that makes dL/dA non-zero) and with a random B of the same size (what a later round's B weighs).
* ``drop missed / wrong``: how much the logistic loss falls when a missed token joins the found ones (the
  median over the missed tokens), against the best of the 24 wrong candidates the pursuit would try next.
* ``layer-1 ranks``: the missed tokens' ranks among the 30,522 candidates on the second block's dL/dA signs,
  each candidate's input taken in context (appended to the found tokens in pick order), by correlation with
  the logistic residuals of the found tokens' fit there (0: the pursuit's first try).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the independent victims
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, table  # noqa: E402
from plain_victims import SENTENCES, adamw_victim, wordpiece  # noqa: E402

from fedpeft.attacks import Observation, run_attack  # noqa: E402
from fedpeft.attacks.lora_io import capture_inputs  # noqa: E402
from fedpeft.attacks.metrics import token_prf  # noqa: E402
from fedpeft.attacks.sign_span import logistic_fit, pursuit, update_rows  # noqa: E402
from fedpeft.attacks.span import deeper_layers, first_layer  # noqa: E402


def output_grads(obs: Observation, ids: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """δ_t per module (T × out): the loss gradient at each module's output, at the global adapter."""
    model = obs.working_model()
    modules = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}

    def keep(path: str):
        def hook(_m: torch.nn.Module, _a: tuple, out: torch.Tensor) -> None:
            out.retain_grad()
            outs[path] = out
        return hook

    handles = [modules[p].register_forward_hook(keep(p)) for p in paths]
    try:
        model.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {p: o.grad[0].detach().to(torch.float64) for p, o in outs.items()}


def token_weights(obs: Observation, ids: torch.Tensor, random_b: bool) -> torch.Tensor:
    """Each position's weight ‖Bᵀ δ_t‖ ‖x_t‖ in the first-block dL/dA rows (root of the sum over modules);
    B: the second step's B₁ = −lr sign(dL/dB) (first round), or a random B of the same size."""
    group, _, _ = first_layer(obs)
    paths = [m.path for m in group]
    x = capture_inputs(obs.working_model(), ids, paths[:1])[paths[0]][0].to(torch.float64)
    deltas = output_grads(obs, ids, paths)
    params = dict(obs.working_model().named_parameters())
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(ids.shape[1], dtype=torch.float64)
    for m in group:
        grad_b = params[m.b_name].grad.to(torch.float64)
        b = torch.randn(grad_b.shape, generator=g, dtype=torch.float64) if random_b else -torch.sign(grad_b)
        total += ((deltas[m.path] @ b).norm(dim=-1) * x.norm(dim=-1)) ** 2
    return total.sqrt()


def loss_drops(obs: Observation, found: list[int], missed: list[int]) -> tuple[float, float]:
    """The logistic loss's fall when one token joins the ``found`` ones: the median over ``missed``, and the
    best over the 24 wrong candidates that correlate most with the residual signs (the pursuit's next tries)."""
    group, cands, _ = first_layer(obs)
    flat = cands.reshape(-1, cands.shape[-1]).to(torch.float64)
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    signs = torch.sign(update_rows(obs, group, flat.shape[-1]))
    margins, u, base = logistic_fit(unit[found], signs)
    resid = signs * torch.sigmoid(-signs * margins)
    score = ((resid @ unit.T) ** 2).sum(0)
    score[found + missed + [0]] = -1.0
    wrong = torch.topk(score, 24).indices.tolist()

    def drop(v: int) -> float:
        return base - logistic_fit(unit[found + [v]], signs, u)[2]

    return statistics.median(drop(v) for v in missed), max(drop(v) for v in wrong)


def layer1_ranks(obs: Observation, found: list[int], missed: list[int], chunk: int = 2048) -> list[int]:
    """The ``missed`` tokens' ranks on the second block's dL/dA signs, every candidate's input taken at the end
    of the ``found`` tokens (in pick order), by correlation with the found tokens' logistic residuals."""
    model = obs.working_model()
    group = deeper_layers(obs)[0][0]
    path = group[0].path
    context = torch.tensor([found])
    chosen = capture_inputs(model, context, [path])[path][0].to(torch.float64)
    signs = torch.sign(update_rows(obs, group, chosen.shape[-1]))
    vocab = model.get_input_embeddings().num_embeddings
    cands = torch.cat([capture_inputs(model, torch.cat([context.repeat(len(b), 1), b[:, None]], 1), [path])[path][:, -1]
                       for b in torch.arange(vocab).split(chunk)]).to(torch.float64)
    margins, _, _ = logistic_fit(chosen / chosen.norm(dim=-1, keepdim=True), signs)
    resid = signs * torch.sigmoid(-signs * margins)
    score = ((resid @ (cands / cands.norm(dim=-1, keepdim=True)).T) ** 2).sum(0)
    score[found + [0]] = -1.0
    rank = torch.empty(vocab, dtype=torch.long)
    rank[torch.argsort(score, descending=True)] = torch.arange(vocab)
    return [int(rank[v]) for v in missed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = wordpiece()
    rows = []
    for seed in range(args.seeds):
        ids = torch.tensor([tok(SENTENCES[seed])["input_ids"][:16]])
        truth = ids[0].tolist()
        obs = adamw_victim("llama", seed, ids)
        f1 = token_prf(run_attack("sign_span", obs).bag, truth)["f1"]
        group, cands, _ = first_layer(obs)
        picks, errors, _ = pursuit(torch.sign(update_rows(obs, group, cands.shape[-1])), cands, 16, 16, floor=0.0)
        hits = [v in truth for _, v in picks]
        first_wrong = hits.index(False) if False in hits else len(hits)
        found = [v for _, v in picks[:first_wrong]]
        missed = [v for v in dict.fromkeys(truth[:-1]) if v not in found and v != 0]
        where = [truth.index(v) for v in missed]
        w_first, w_later = token_weights(obs, ids, False), token_weights(obs, ids, True)
        pos_found = [truth.index(v) for v in found]
        ratio = [float(w[where].median() / w[pos_found].median()) for w in (w_first, w_later)]
        drop_missed, drop_wrong = loss_drops(obs, found, missed)
        rows.append([seed, f"{f1:.2f}", f"{token_prf(found, truth)['f1']:.2f}",
                     "".join("T" if h else "F" for h in hits[8:]),
                     f"{errors[first_wrong - 1] if first_wrong else 1.0:.3f}",
                     " ".join(tok.convert_ids_to_tokens(missed)), " ".join(map(str, where)),
                     f"{ratio[0]:.2f} / {ratio[1]:.2f}", f"{drop_missed:.1f} / {drop_wrong:.1f}",
                     " ".join(map(str, layer1_ranks(obs, found, missed)))])
        print(*rows[-1], flush=True)
    body = ("Tiny random LLaMA (hidden 64, q/k/v LoRA r = 8), first round (B = 0), five torch AdamW steps (lr 1e-3, "
            "weight decay 0.01) on one English sentence of 16 WordPiece tokens (tests/plain_victims.py::"
            "adamw_victim). picks: sign_span's pursuit without its floor, picks 9-16 (T right, F wrong); "
            "unexplained: the fraction of signs left when the first wrong token came; ceiling: the bag F1 of the "
            "picks before it (the best any stopping rule can do); missed: the tokens those picks lack; weight: "
            "the missed tokens' median weight ‖Bᵀ δ_t‖ ‖x_t‖ in the dL/dA rows over the found tokens' median, with "
            "the first round's B₁ = −lr sign(dL/dB) / a random B; drop: the logistic loss's fall when a missed "
            "token joins the found ones (median) / the best of the 24 wrong candidates tried next; layer-1 ranks: "
            "the missed tokens' ranks on the second block's signs, each candidate's input in the context of the "
            "found tokens (pick order).\n\n"
            + table(["seed", "bag F1", "ceiling", "picks 9-16", "unexplained", "missed", "positions",
                     "weight first / later", "drop missed / wrong", "layer-1 ranks"], rows))
    print(body)
    if not args.no_append:
        append_results(f"Why sign_span misses first-round tokens: AdamW x5, B = 1 (seeds 0-{args.seeds - 1})", body)


if __name__ == "__main__":
    main()
