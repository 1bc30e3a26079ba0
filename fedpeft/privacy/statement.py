"""The privacy guarantee of a run, stated in words for ``summary.md``: what is protected, against whom,
under which neighbouring relation and sampling scheme, and what is released outside it."""

from __future__ import annotations

from typing import Any

from fedpeft.config import Config
from fedpeft.privacy.tuning import SERVER_NOISE_MODES

#: the metrics.jsonl key of each DP mode's accounted epsilon (under ``both``: both the client and the local one)
EPSILON_KEYS = {"local": "epsilon_local", "client": "epsilon_client", "distributed": "epsilon_distributed"}


def guarantee_lines(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown bullet lines describing the run's DP guarantee (a single line when DP is off)."""
    p = cfg.privacy
    if p.mode == "none":
        return ["- privacy: no differential privacy (updates and metrics travel as computed)"]
    lines = [f"- privacy: mode `{p.mode}`, delta {p.delta:g}, accountant `{p.accountant}`, rounds 1-{len(rows)} "
             "covered" + ("" if p.mode == "local" else " (every charge in privacy-ledger.jsonl)"),
             *_server_noise_lines(cfg, rows),
             "  - **outside the guarantee**: this summary's round table and metrics.jsonl (counts, byte sizes, "
             "timings, drop reasons): keep them with the server, publish the adapters"]
    if p.mode in ("client", "both"):
        lines.append("  - server noise: drawn from run.seed in a simulation (reproducible; anyone holding config.toml "
                     "can remove it, so a simulation's adapters are not private), from the operating system's "
                     "entropy in a deployment")
        eps = rows[-1].get("epsilon_client") if rows else None
        relation = ("add/remove one client; each eligible client joins a round independently with probability "
                    "q = clients_per_round / eligible clients (Poisson), charged per round"
                    if p.client_sampling == "poisson" else
                    "replace one client's data; exactly clients_per_round of the eligible clients per round "
                    "(fixed size, without replacement), update sensitivity 2C")
        lines.append(f"  - client level (unit: a client's whole data): epsilon {eps if eps is not None else 'n/a'}"
                     f" against anyone who sees the global adapters; neighbouring federations: {relation}. The "
                     "server itself sees each decoded update (use SecAgg+ or local DP against the server)")
        if p.client_sampling == "poisson":
            lines.append("  - Poisson sampling: each round's counts (sampled, replies, sample_rate) depend on which "
                         "clients exist; every round releases the noised sum (the noise alone when no update "
                         "arrived: federation.min_clients does not skip rounds under client-level DP)")
    if p.mode == "distributed":
        eps = rows[-1].get("epsilon_distributed") if rows else None
        delta = rows[-1].get("delta_distributed", p.delta) if rows else p.delta
        shown = f"{eps} at delta {delta:.4g}" if eps is not None else "n/a"
        lines.append(f"  - client level (unit: a client's whole data), distributed: epsilon {shown} (privacy.delta "
                     "plus, per round, (1 + e^epsilon) x 1e-12 for a noise share SecAgg+ would clip) against the "
                     "server and anyone after it. Each client clips to C, rounds onto an integer grid and adds a "
                     "discrete Gaussian share inside SecAgg+; any privacy.secagg_min_survivors shares give the sum "
                     "the accounted noise; replace-one relation, no amplification by sampling (the server picks "
                     "the clients). Colluding clients that reveal their shares are not covered")
    if p.mode in ("local", "both"):
        lines.append("  - record level (unit: one training example), DP-SGD on each client: each client's update is "
                     "private against the server; each client's epsilon depends on its data size and stays on the "
                     "client" + ("" if not p.release_client_metrics else " (released: epsilon_local)"))
    if p.release_client_metrics:
        lines.append("  - **outside the guarantee** (`privacy.release_client_metrics = true`): per-client train "
                     "loss, example counts, steps, timings and local epsilon were sent in the clear; train_loss in "
                     "metrics.jsonl is their unnoised average" + (
                         "; federated evaluation: each client's eval counts, and fed_eval_clients per client"
                         + (" (personal_eval_*: after a fine-tune on its training data without DP)"
                            if cfg.federation.personalization == "finetune" else "")
                         if cfg.federation.evaluation != "server" else ""))
    else:
        lines.append("  - released in the clear: the clients' simulation index, split-learning traffic sizes and "
                     "(client level, adaptive clipping) each client's 0/1 clip indicator to the server, which "
                     "releases only their noised count; updates are weighted uniformly")
    return lines


def _server_noise_lines(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """Client-level / distributed DP: the noise multiplier used and, when it came from ``target_epsilon``, the
    target and whether the accounted epsilon stayed within it (a round at a higher sampling rate than planned,
    or more rounds than planned, spends more)."""
    p = cfg.privacy
    if p.mode not in ("client", "both", "distributed"):
        return []
    line = f"  - noise multiplier z = {p.server_noise_multiplier:.4g}"
    if p.mode in SERVER_NOISE_MODES and p.target_epsilon > 0:
        eps = rows[-1].get(EPSILON_KEYS[p.mode]) if rows else None
        line += (f", derived from target epsilon {p.target_epsilon:g} over {cfg.federation.rounds} planned rounds"
                 + (f": **exceeded** (epsilon {eps:.4g})" if eps is not None and eps > p.target_epsilon else ""))
    return [line]
