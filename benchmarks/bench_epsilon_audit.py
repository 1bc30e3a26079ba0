"""Tightness of the empirical epsilon audit (one run, Steinke et al. 2023, tested against the accountant's
whole privacy profile) on both DP levels: the server's client-level mechanism and the clients' DP-SGD.

Usage: ``python benchmarks/bench_epsilon_audit.py [--canaries 16384,32768,131072] [--seeds 3]
[--levels client,example] [--claims 1,2,4] [--divisors 1,2,4] [--no-append]`` (example level up to 32,768 canaries)

For claimed epsilon about 1, 2 and 4 (one round or one DP-SGD step, every canary sampled, delta 1e-5) and
for the noise the accountant assumes, half of it and a quarter of it (``noise_divisor`` 1, 2, 4: a bug of
that size), the table gives the 95% lower bound (mean and range over seeds) beside the claim. A lower bound
above the claim is a detected bug. Appends a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, table  # noqa: E402

from fedpeft import config  # noqa: E402
from fedpeft.audit.epsilon import audit_client_level, audit_local_dpsgd  # noqa: E402

NOISE = {1: 4.0, 2: 2.2, 4: 1.2}  # noise multiplier giving about that epsilon in one round / step at q = 1
EXAMPLE_MAX = 32768  # canary records beyond this need more than ~8 GiB


def _audit(level: str, z: float, canaries: int, seed: int, divisor: float):  # type: ignore[no-untyped-def]
    if level == "client":
        cfg = config.load(None, ["privacy.mode=client", f"privacy.server_noise_multiplier={z}",
                                 "privacy.clip_norm=1.0", "privacy.delta=1e-5", "federation.rounds=1"])
        return audit_client_level(cfg, canaries, seed=seed, noise_divisor=divisor)
    cfg = config.load(None, ["privacy.mode=local", f"privacy.noise_multiplier={z}", "privacy.max_grad_norm=1.0",
                             "privacy.delta=1e-5"])
    return audit_local_dpsgd(cfg, canaries, seed=seed, noise_divisor=divisor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", default="16384,32768,131072")
    ap.add_argument("--levels", default="client,example")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--divisors", default="1,2,4")
    ap.add_argument("--claims", default="1,2,4", help="claimed epsilons to audit (keys of NOISE)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    rows = []
    for level in args.levels.split(","):
        for k in (int(v) for v in args.canaries.split(",")):
            if level == "example" and k > EXAMPLE_MAX:
                continue  # one Opacus batch of K x K floats
            for z in (NOISE[int(c)] for c in args.claims.split(",")):
                for divisor in (float(d) for d in args.divisors.split(",")):
                    t0 = time.perf_counter()
                    runs = [_audit(level, z, k, s, divisor) for s in range(args.seeds)]
                    bounds = [r.bound.epsilon_lower_bound for r in runs]
                    claimed = runs[0].claimed_epsilon
                    rows.append([level, k, f"{claimed:.2f}", f"{divisor:g}", f"{statistics.mean(bounds):.2f}",
                                 f"{min(bounds):.2f}-{max(bounds):.2f}", f"{min(bounds) / claimed:.2f}",
                                 sum(b > claimed for b in bounds), f"{(time.perf_counter() - t0) / args.seeds:.1f}"])
                    print(*rows[-1], flush=True)
    text = table(["level", "canaries", "claimed eps", "noise / x", "lower bound", "range", "worst bound / claim",
                  "flagged (of seeds)", "s per audit"], rows)
    print(text)
    if not args.no_append:
        append_results("Empirical epsilon audit tightness (profile test)", text)


if __name__ == "__main__":
    main()
