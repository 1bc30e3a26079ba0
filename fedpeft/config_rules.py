"""Cross-section configuration rules: checks that a single key's type, choices and range cannot express
(codec specs, DP with adapters and strategies, robust strategies with SecAgg+ and DP, split learning cut
points, SecAgg+ parameters).

Run by :func:`fedpeft.config.from_dict`, so every way of building a Config goes through them; each error
names the keys, the bad values and the way out.
"""

from __future__ import annotations

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
    if cfg.data.partition == "natural" and not cfg.data.group_column:
        raise ConfigError("data.partition = 'natural' needs data.group_column (the natural client id)")
    if cfg.federation.clients_per_round > cfg.data.num_clients:
        raise ConfigError(
            f"federation.clients_per_round = {cfg.federation.clients_per_round} exceeds "
            f"data.num_clients = {cfg.data.num_clients}")
    if cfg.federation.min_clients > max(1, cfg.federation.clients_per_round or cfg.data.num_clients):
        raise ConfigError(
            f"federation.min_clients = {cfg.federation.min_clients} exceeds the clients sampled per round")
    if cfg.train.local_steps == 0 and cfg.train.local_epochs == 0:
        raise ConfigError("set train.local_steps > 0 or train.local_epochs > 0")
    if cfg.model.task == "causal_lm" and cfg.data.source == "bbc_news":
        raise ConfigError("model.task = 'causal_lm' needs prompt/response data: data.source = 'chatterbot' or 'file'")
    if cfg.model.task == "classification" and cfg.data.source == "chatterbot":
        raise ConfigError("data.source = 'chatterbot' is prompt/response data: set model.task = 'causal_lm'")
    if cfg.privacy.mode in ("local", "both") and cfg.federation.strategy == "fedprox":
        raise ConfigError("local DP-SGD with fedprox is not supported (the proximal term is not a per-example "
                          "loss); use fedavg or a server optimizer")
    if cfg.privacy.mode in ("local", "both") and cfg.adapter.type == "ia3":
        raise ConfigError("local DP-SGD supports adapter.type = 'lora', 'prefix' or 'prompt', not 'ia3' "
                          "(peft keeps IA3 vectors in a ParameterDict, which gets no per-example gradients)")
    if cfg.adapter.type == "lora" and cfg.adapter.alpha <= 0:
        raise ConfigError("adapter.alpha must be > 0 for LoRA")
    _validate_strategy(cfg)
    if cfg.privacy.mode != "none":  # what needs no data now; the server repeats it with the client data sizes
        from fedpeft.privacy.checks import check_privacy

        check_privacy(cfg.privacy, cfg.data.num_clients, cfg.federation.clients_per_round, cfg.federation.rounds,
                      min_local_examples=1)
    if cfg.federation.lora_aggregation != "naive":
        _validate_lora(cfg)
    if cfg.split.enabled:
        _validate_split(cfg)
    if cfg.privacy.secure_aggregation == "secaggplus":
        _validate_secagg(cfg)
    _validate_secure_uplink(cfg)
    if cfg.federation.evaluation != "server":
        _validate_federated_evaluation(cfg)
    if cfg.adversary.attack != "none" or cfg.adversary.fraction or cfg.adversary.clients:
        _validate_adversary(cfg)


def _validate_strategy(cfg: Config) -> None:
    """What an aggregator cannot combine with: robust ones need every client's update and do not add DP noise."""
    from fedpeft.server.aggregators import AGGREGATORS

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
    if fed.strategy == "krum":
        m, f = fed.clients_per_round or cfg.data.num_clients, fed.byzantine_clients
        if m < 2 * f + 3:
            raise ConfigError(f"{strategy} with federation.byzantine_clients = {f} needs at least 2f + 3 = {2 * f + 3} "
                              f"clients per round (got {m}): sample more clients or lower federation.byzantine_clients")
        if fed.multi_krum > m - f:
            raise ConfigError(f"federation.multi_krum = {fed.multi_krum} exceeds the n - f = {m - f} updates Krum can "
                              "trust per round")


def _validate_lora(cfg: Config) -> None:
    """What each federation.lora_aggregation mode cannot combine with (docs/lora-aggregation.md)."""
    mode = cfg.federation.lora_aggregation
    key = f"federation.lora_aggregation = {mode!r}"
    if cfg.adapter.type != "lora":
        raise ConfigError(f"{key} needs adapter.type = 'lora' (got {cfg.adapter.type!r}); other adapters use 'naive'")
    if cfg.split.enabled:
        raise ConfigError(f"{key} does not combine with split.enabled (the split cut chooses which adapter tensors "
                          "travel); use federation.lora_aggregation = 'naive'")
    if mode not in ("exact", "svd"):
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
