"""SecAgg+ with a compressed uplink (``privacy.secagg_bits``, ``privacy.secagg_keep``) and distributed DP
(``privacy.mode = "distributed"``), on the real Flower SecAgg+ workflow and mod, in-process engine.

The plain round of :mod:`test_secagg` is the reference: the same seeded clients train the same deltas, so
the secure sum can be compared with what each client really computed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import test_secagg
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from test_secagg import DROPOUT_OK, SECAGG, RecordingGrid, flat, make_cfg, one_round, secagg_bound, weighted

from fedpeft import config, protocol
from fedpeft.compression import make_codec
from fedpeft.compression.bits import nbytes_for
from fedpeft.compression.secure import digit_groups, levels_for, subspace, unpack_field
from fedpeft.errors import ConfigError, PrivacyError
from fedpeft.privacy.accounting import FIXED_ORDERS, ClientLevelAccountant
from fedpeft.privacy.distributed import TAIL_PROBABILITY, DistributedDP, discrete_gaussian
from fedpeft.simulation.inprocess import node_id

data, plain = test_secagg.data, test_secagg.plain  # the module-scoped fixtures of the plain reference round

BITS = {"privacy.secagg_bits": 8}
R16 = {"adapter.r": 16}  # ~9,000 summed elements: the std of the noise is measured to about 0.8 %
DDP = {**SECAGG, **R16, "privacy.mode": "distributed", "privacy.delta": 1e-3, "privacy.clip_norm": 0.5}


def clipping_range(plain) -> dict[str, float]:
    """A per-element range just above the largest plain delta element (nothing is clipped)."""
    return {"privacy.secagg_clipping_range": 1.1 * max(float(np.abs(c[0]).max()) for c in plain["clients"].values())}


def masked_replies(grid) -> list:
    return [r for r in grid.seen if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]


# ---------------------------------------------------------------- part 1: the compressed secure uplink

def test_the_integer_uplink_sums_the_plain_updates_at_log2_m_levels_bits(data, plain):
    cfg = make_cfg(data, **SECAGG, **BITS, **clipping_range(plain))
    server, grid, row, start = one_round(cfg, data[1] / "bits")
    assert row["replies"] == 3 and row["secagg_clipped"] == 0
    levels = levels_for(8)
    modulus = 3 * levels + 1  # the exact field: 763, not the power of 2 above it (1024)
    assert server.secagg.field.modulus_range == modulus
    assert digit_groups(modulus) == (5, 48)  # 763**5 < 2**48: 9.6 bits an element, log2(763) = 9.58
    weights = [c[1] for c in plain["clients"].values()]
    mean = flat(server.global_state, plain["names"]) - flat(start, plain["names"])
    bound = secagg_bound(weights, server.secagg.max_weight, [c[0] for c in plain["clients"].values()],
                         cfg.privacy.secagg_clipping_range, levels)
    assert float(np.abs(mean - plain["mean"]).max()) <= bound
    assert np.corrcoef(mean, plain["mean"])[0, 1] > 0.9  # the grid is fine enough to carry the update
    width = server.layout.total
    for reply in masked_replies(grid):  # one byte string per client: (factor + vector) in groups of 5, 48 bits each
        (packed,) = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        assert len(packed) == nbytes_for(math.ceil((width + 1) / 5) * 48) < nbytes_for((width + 1) * 10)
    assert len(masked_replies(grid)) == 3


class SeedGrid(RecordingGrid):
    """The in-process grid, noting the subspace seeds the server sends."""

    seeds: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if "fitins.config" in msg.content.config_records:
                self.seeds.append(int(msg.content.config_records["fitins.config"][protocol.SUBSPACE_SEED]))
        return super().push_messages(messages)


def test_a_shared_subspace_sums_the_same_coordinates_of_every_client(data, plain, monkeypatch):
    monkeypatch.setattr(test_secagg, "RecordingGrid", SeedGrid)
    cfg = make_cfg(data, **SECAGG, **BITS, **clipping_range(plain), **{"privacy.secagg_keep": 0.25})
    server, grid, row, start = one_round(cfg, data[1] / "keep")
    assert row["replies"] == 3 and len(SeedGrid.seeds) == 3 and len(set(SeedGrid.seeds)) == 1  # one per round
    mean = flat(server.global_state, plain["names"]) - flat(start, plain["names"])
    k = int(np.ceil(0.25 * server.layout.total))
    kept = subspace(SeedGrid.seeds[0], server.layout.total, 0.25)
    assert len(kept) == k and not mean[np.setdiff1d(np.arange(mean.size), kept)].any()  # zero outside it
    weights = [c[1] for c in plain["clients"].values()]
    bound = secagg_bound(weights, server.secagg.max_weight, [c[0] for c in plain["clients"].values()],
                         cfg.privacy.secagg_clipping_range, levels_for(8))
    # on the subspace: the plain mean scaled by 1 / keep (unbiased), i.e. every client kept the same coordinates
    assert float(np.abs(mean[kept] * 0.25 - plain["mean"][kept]).max()) <= bound
    for reply in masked_replies(grid):
        (packed,) = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        assert len(packed) == nbytes_for(math.ceil((k + 1) / 5) * 48)  # field 763: 5 elements in 48 bits


class CorruptingGrid(RecordingGrid):
    """The in-process grid; one node's packed masked vector loses its last byte on the way."""

    victim = node_id(1)

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            stage_reply = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if reply.metadata.src_node_id == self.victim and Key.MASKED_PARAMETERS in stage_reply:
                stage_reply[Key.MASKED_PARAMETERS] = [stage_reply[Key.MASKED_PARAMETERS][0][:-1]]
        return replies


def test_a_malformed_masked_vector_costs_that_client_not_the_round(data, plain, monkeypatch):
    monkeypatch.setattr(test_secagg, "RecordingGrid", CorruptingGrid)
    cfg = make_cfg(data, **SECAGG, **BITS, **DROPOUT_OK, **clipping_range(plain))
    server, grid, row, start = one_round(cfg, data[1] / "corrupt")
    assert isinstance(grid, CorruptingGrid)
    assert row["replies"] == 2 and row["dropped"] == 1 and row["train_loss"] is not None
    survivors = sorted(n for n in plain["clients"] if n != CorruptingGrid.victim)
    expected, weights = weighted(plain["clients"], survivors)
    mean = flat(server.global_state, plain["names"]) - flat(start, plain["names"])
    bound = secagg_bound(weights, server.secagg.max_weight, [plain["clients"][n][0] for n in survivors],
                         cfg.privacy.secagg_clipping_range, levels_for(8))
    assert float(np.abs(mean - expected).max()) <= bound


def test_the_plain_sint_codec_is_the_same_grid_in_the_clear():
    from fedpeft.compression import Layout

    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(0, 0.003, (64, 40)).astype(np.float32)}
    import torch

    state = {k: torch.from_numpy(v) for k, v in delta.items()}
    layout = Layout.from_state(state)
    codec = make_codec("sint:8,range=0.02")
    decoded = [layout.flatten(codec.decode(codec.encode(state, layout, rng=np.random.default_rng(i)), layout))
               for i in range(300)]
    step = 0.04 / levels_for(8)
    grid = (np.stack(decoded) + 0.02) / step
    assert np.allclose(grid, np.rint(grid), atol=1e-3)  # on the grid of 2**8 - 1 points
    assert np.abs(np.mean(decoded, axis=0) - delta["a"].ravel()).max() < 4 * step / np.sqrt(300) * 2  # unbiased
    assert codec.encode(state, layout, rng=rng).nbytes < layout.total + 100  # 8 bits an element


# ---------------------------------------------------------------- part 2: distributed DP

def test_the_discrete_gaussian_sampler_has_the_claimed_std():
    rng = np.random.default_rng(7)
    for sigma in (2.5, 40.5, 700.2):
        x = discrete_gaussian(sigma, 200_000, rng)
        assert x.dtype == np.int64
        assert abs(x.std() / sigma - 1) < 0.01 and abs(x.mean()) < 5 * sigma / np.sqrt(x.size)


def test_distributed_accounting_is_the_gaussian_mechanism_at_the_weakest_released_sum():
    dp = DistributedDP(clip=1.0, dim=9000, clients=10, min_survivors=6, noise_multiplier=1.3, grid=4.0)
    assert dp.accounted_noise_multiplier == pytest.approx(1.3)  # n_min shares give std z * Delta
    assert dp.noise_multiplier_for(5) < 1.3 < dp.noise_multiplier_for(10)
    assert dp.sensitivity > dp.norm_bound  # stochastic rounding's norm inflation is paid for
    acc = ClientLevelAccountant("rdp", "fixed")
    acc.step(dp.accounted_noise_multiplier, 1.0)
    # replace-one relation: sensitivity 2 * Delta, i.e. the Gaussian mechanism at noise multiplier z / 2
    rdp = compute_rdp(q=1.0, noise_multiplier=1.3 / 2, steps=1, orders=FIXED_ORDERS)
    assert acc.epsilon(1e-5) == pytest.approx(get_privacy_spent(orders=FIXED_ORDERS, rdp=rdp, delta=1e-5)[0])
    assert 10 * dp.levels < 2**dp.modulus_bits <= 2 * 10 * dp.levels  # the smallest field the sum cannot wrap


def test_distributed_accounting_charges_the_tau_term_of_the_largest_sum():
    """Kairouz et al.'s tau grows with the shares in the sum while the Gaussian part shrinks: with small shares the
    weakest sum is the largest one, not the n_min one (10 elements, shares of std 0.57)."""
    dp = DistributedDP(clip=1.0, dim=10, clients=50, min_survivors=5, noise_multiplier=0.6, grid=0.1)
    assert 0.5 < dp.sigma_share < 0.6
    weakest = min(dp.noise_multiplier_for(n) for n in range(dp.min_survivors, dp.clients + 1))
    assert weakest == dp.noise_multiplier_for(dp.clients) < dp.noise_multiplier_for(dp.min_survivors)
    assert dp.accounted_noise_multiplier <= weakest
    with pytest.raises(PrivacyError, match="needs >= 0.5"):  # below it the sum bound does not apply
        DistributedDP(clip=1.0, dim=10, clients=50, min_survivors=5, noise_multiplier=0.5, grid=0.1)


@pytest.fixture(scope="module")
def plain16(data):
    """The plain round at adapter.r = 16: each client's delta (float64)."""
    cfg = make_cfg(data, **R16)
    server, grid, row, start = one_round(cfg, data[1] / "plain16")
    codec = make_codec("none")
    return {r.metadata.src_node_id: flat(codec.decode(protocol.parse_reply(r.content)[0], server.layout),
                                         server.layout.names) for r in grid.seen}


def signal(ddp: DistributedDP, delta: np.ndarray) -> np.ndarray:
    """A client's update on the integer grid before rounding: clipped to C, divided by the step."""
    norm = np.linalg.norm(delta)
    return delta * min(1.0, ddp.clip / norm) / ddp.scale


def noise_of_sum(server, start, clients: dict[int, np.ndarray], nodes) -> tuple[np.ndarray, np.ndarray]:
    """(noise in the released integer sum, variance the stochastic rounding adds per element)."""
    ddp, names = server.secagg.ddp, server.layout.names
    n = len(nodes)
    total = np.rint((flat(server.global_state, names) - flat(start, names)) * n / ddp.scale)
    xs = [signal(ddp, clients[node]) for node in nodes]
    frac = [x - np.floor(x) for x in xs]
    return total - sum(xs), sum(f * (1 - f) for f in frac)


def test_the_noise_in_the_unmasked_sum_has_the_claimed_distribution(data, plain16):
    cfg = make_cfg(data, **DDP)
    server, grid, row, start = one_round(cfg, data[1] / "ddp")
    ddp = server.secagg.ddp
    assert row["replies"] == 3 and row["secagg_clipped"] == 0 and ddp.dim > 8000
    noise, rounding_var = noise_of_sum(server, start, plain16, sorted(plain16))
    claimed = np.sqrt(3 * ddp.sigma_share**2 + rounding_var.mean())
    assert abs(noise.std() / claimed - 1) < 0.03
    assert abs(noise.mean()) < 4 * claimed / np.sqrt(noise.size)
    z = noise / claimed  # a sum of discrete Gaussians: Gaussian shape (excess kurtosis ~ 0, not a Laplace's 3)
    assert abs(float(np.mean(z**4)) - 3) < 0.4  # 4 standard errors at d ~ 9,000; a Laplace would give 6
    assert row["epsilon_distributed"] > 0 and row["noise_multiplier_accounted"] == pytest.approx(1.0)


def test_with_dropouts_down_to_the_minimum_the_sum_still_carries_the_accounted_noise(data, plain16):
    cfg = make_cfg(data, **DDP, **DROPOUT_OK)
    victim = node_id(1)
    server, grid, row, start = one_round(cfg, data[1] / "ddp-drop", drop=(victim, Stage.COLLECT_MASKED_VECTORS))
    ddp = server.secagg.ddp
    assert row["replies"] == 2 and row["dropped"] == 1 and ddp.min_survivors == 2
    noise, _ = noise_of_sum(server, start, plain16, sorted(n for n in plain16 if n != victim))
    accounted_std = ddp.accounted_noise_multiplier * ddp.sensitivity
    assert noise.std() >= 0.97 * accounted_std  # measured: what the accountant charged is there
    assert abs(noise.std() / accounted_std - 1) < 0.03  # and no more: two shares are exactly the margin
    acc = ClientLevelAccountant("rdp", "fixed")
    acc.step(ddp.accounted_noise_multiplier, 1.0)
    assert row["epsilon_distributed"] == pytest.approx(acc.epsilon(cfg.privacy.delta))


def test_the_server_never_receives_an_un_noised_individual_update(data, plain16, monkeypatch):
    from fedpeft.clients import secagg as client_secagg

    entering = []  # what each client hands Flower's mod to mask (client side, never sent)
    real = client_secagg.ndarrays_to_parameters
    monkeypatch.setattr(client_secagg, "ndarrays_to_parameters", lambda arrays: entering.append(arrays[0]) or
                        real(arrays))
    cfg = make_cfg(data, **DDP)
    server, grid, row, start = one_round(cfg, data[1] / "ddp-seen")
    ddp, field = server.secagg.ddp, server.secagg.field
    assert len(entering) == 3
    for vector in entering:  # already noised before masking: the residual of every client's signal is noise
        assert min(float(np.std(vector - signal(ddp, d))) for d in plain16.values()) > 0.95 * ddp.sigma_share
    replies = masked_replies(grid)
    assert len(replies) == 3
    for reply in grid.seen:
        assert protocol.UPDATE not in reply.content
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    for reply in replies:  # the bytes the server gets: one packed string of uniform field elements
        (packed,) = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        factor, vector = unpack_field(packed, [1, field.width], field.modulus_range)
        delta = plain16[reply.metadata.src_node_id]
        assert abs(np.corrcoef(vector.astype(np.float64), delta)[0, 1]) < 0.1
        assert abs(vector.mean() / field.modulus_range - 0.5) < 0.02  # uniform over [0, M)
        assert factor[0] != field.quantization_range  # the weight factor is masked too


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra, match", [
    ({"privacy.mode": "distributed"}, "needs privacy.secure_aggregation = 'secaggplus'"),
    ({**SECAGG, "privacy.mode": "distributed", "privacy.adaptive_clip": True}, "adaptive_clip = false"),
    ({**SECAGG, "privacy.mode": "distributed", "privacy.accountant": "prv"}, "accountant = 'rdp'"),
    ({**SECAGG, "privacy.mode": "distributed", **BITS}, "secagg_bits = 0"),
    ({**BITS}, "sint:BITS"),
    ({"privacy.secagg_keep": 0.5}, "secure_aggregation = 'secaggplus'"),
    ({**SECAGG, **BITS, "privacy.mode": "client"}, "privacy.mode = 'distributed'"),
    ({**SECAGG, "compression.uplink": "sint:8"}, "privacy.secagg_bits"),
    ({**SECAGG, "privacy.secagg_keep": 0.0}, "secagg_keep"),
])
def test_combinations_that_cannot_compose_are_refused_naming_the_choices(data, extra, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(data, **extra)


def test_a_config_with_distributed_dp_loads(data):
    cfg = make_cfg(data, **DDP)
    assert isinstance(cfg, config.Config) and cfg.privacy.mode == "distributed"


@pytest.mark.parametrize("modulus, per_group, group_bits", [(2**13, 1, 13), (10 * levels_for(8) + 1, 3, 34)])
def test_packed_field_round_trips_and_refuses_a_malformed_string(modulus, per_group, group_bits):
    from fedpeft.compression.secure import pack_field
    from fedpeft.errors import PayloadError

    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, modulus, 1), rng.integers(0, modulus, 1001), np.array([modulus - 1])]
    assert digit_groups(modulus) == (per_group, group_bits)  # 2541 (m = 10, b = 8): 11.33 bits an element, not 12
    packed = pack_field(arrays, modulus)
    assert len(packed) == nbytes_for(math.ceil(1003 / per_group) * group_bits)
    assert all(np.array_equal(a, b) for a, b in zip(unpack_field(packed, [1, 1001, 1], modulus), arrays))
    for bad in (packed[:-1], packed + b"\0"):
        with pytest.raises(PayloadError, match="packed masked vector"):
            unpack_field(bad, [1, 1001, 1], modulus)
    with pytest.raises(PayloadError, match="outside"):
        pack_field([np.array([modulus])], modulus)
    if per_group > 1:  # every bit string of a power-of-2 field is valid; base-M groups can be out of range
        with pytest.raises(PayloadError, match="not 3 digits"):
            unpack_field(b"\xff" * 5 + packed[5:], [1, 1001, 1], modulus)
        longer = pack_field([*arrays, np.array([7])], modulus)  # 1004 and 1003 elements: the same 335 groups
        with pytest.raises(PayloadError, match="nonzero padding"):
            unpack_field(longer, [1, 1001, 1], modulus)


@pytest.mark.parametrize("key, value, match", [
    ("clip_norm", 0.0, "clip_norm > 0"),
    ("server_noise_multiplier", 0.0, "server_noise_multiplier > 0"),
    ("delta", 0.5, "1/N"),
])
def test_check_privacy_refuses_distributed_settings_without_a_guarantee(key, value, match):
    from dataclasses import replace

    from fedpeft.config import PrivacySection
    from fedpeft.errors import PrivacyError
    from fedpeft.privacy import check_privacy

    p = replace(PrivacySection(), mode="distributed", secure_aggregation="secaggplus", **{key: value})
    with pytest.raises(PrivacyError, match=match):
        check_privacy(p, num_clients=10, clients_per_round=5, rounds=3, min_local_examples=10)


def test_the_distributed_accountant_resumes_and_the_summary_states_the_guarantee(data):
    from fedpeft.privacy.server_dp import ServerPrivacy
    from fedpeft.privacy.statement import guarantee_lines

    cfg = make_cfg(data, **DDP)
    first = ServerPrivacy(cfg)
    assert not first.active and first.distributed  # no server noise: the clients add it
    rows = [first.charge_distributed(0.8), first.charge_distributed(0.8)]
    meta, tensors = first.state()
    resumed = ServerPrivacy(cfg)
    resumed.restore(meta, tensors)
    again = resumed.charge_distributed(0.8)
    fresh = ClientLevelAccountant("rdp", "fixed")
    for _ in range(3):
        fresh.step(0.8, 1.0)
    assert again["epsilon_distributed"] == pytest.approx(fresh.epsilon(cfg.privacy.delta))
    assert rows[1]["epsilon_distributed"] < again["epsilon_distributed"]
    # delta: privacy.delta plus, per round, (1 + e^eps) x the chance that SecAgg+ clips a noised element
    tail = 3 * (1 + math.exp(again["epsilon_distributed"])) * TAIL_PROBABILITY
    assert again["delta_distributed"] == pytest.approx(cfg.privacy.delta + tail, rel=1e-12)
    assert again["delta_distributed"] > cfg.privacy.delta
    text = "\n".join(guarantee_lines(cfg, [*rows, again]))
    assert f"epsilon {again['epsilon_distributed']} at delta {again['delta_distributed']:.4g}" in text
    assert "no amplification by sampling" in text


def test_a_field_beyond_32_bits_is_refused_naming_the_knobs():
    with pytest.raises(PrivacyError, match="distributed_grid"):
        DistributedDP(clip=1.0, dim=10**7, clients=5000, min_survivors=2, noise_multiplier=10.0, grid=4.0)


def test_local_dp_clients_hide_their_sizes_and_the_integer_sum_still_carries_them(tmp_path):
    """Under local DP-SGD the clients send weight 1 (their sizes are private), so SecAgg+'s weight cap is 1 too: with
    the cap at the largest partition (750 examples here) a weight of 1 quantized onto 8 bits' 255 levels was 0,
    and every round's sum came back empty (found in the frontier's local / int8-secure cell)."""
    from fedpeft import report
    from fedpeft.simulation import runner

    from conftest import tiny_overrides, write_classification

    path = write_classification(tmp_path / "big.jsonl", n=3000)  # 750 training examples a client
    cfg = config.load(None, tiny_overrides(path, tmp_path / "runs", **{
        **SECAGG, **BITS, "privacy.mode": "local", "privacy.target_epsilon": 8.0, "data.num_clients": 3,
        "federation.rounds": 1, "train.local_steps": 1}))
    rows = report.read_metrics(runner.simulate(cfg))
    assert rows[0]["replies"] == 3 and rows[0]["dropped"] == 0
