"""Local DP-SGD (Opacus) on tiny peft models: exactness, noise calibration, sampling, accounting, soft prompt.

Exactness: with noise 0 one DP step must move the trainable parameters by exactly
``lr * mean_i(clip(g_i))`` where ``g_i`` is example i's gradient from plain autograd, one example at a
time, and ``clip(g) = g * min(1, C / (|g| + 1e-6))`` (Opacus' flat clipping). The per-example
reference cannot reproduce a random batch, so the DP step runs on a fixed batch of exactly the
expected batch size ``B`` (the optimizer divides by the *expected* batch size under Poisson sampling;
with a batch of exactly B it is the mean). Dropout is 0 (it is random per example, so the
one-at-a-time reference could not replay it); C is the median per-example norm, so some examples
are clipped and some are not.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleHooks
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from fedpeft.config import PrivacySection
from fedpeft.errors import PrivacyError
from fedpeft.models import MeanPoolClassifier
from fedpeft.privacy import LocalDP, SoftPromptModel, causal_lm_loss, derive_noise_multiplier

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
VOCAB, B, T = 300, 6, 10


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64, num_labels=3,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(cfg)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "y": torch.arange(B) % 3}


def cls_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["y"]).loss


def lm_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return causal_lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])


def lora_bert() -> nn.Module:
    return peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                            init_lora_weights=False))


def lora_gpt2() -> nn.Module:
    return peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"],
                                                            fan_in_fan_out=True, init_lora_weights=False))


def prefix_gpt2() -> nn.Module:
    return peft.get_peft_model(tiny_gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def prefix_bert() -> nn.Module:
    # fedpeft's pooling head: an architecture's own classification head refuses prefixes from transformers 5.24 on
    # (tests/test_models.py::test_prefix_tuning_refused_exactly_where_peft_cannot_pass_prefixes)
    base = MeanPoolClassifier(tiny_bert().bert, num_labels=3, pooling="cls")
    return peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                                             prefix_projection=True, encoder_hidden_size=16))


def peft_prompt_bert() -> nn.Module:
    m = peft.get_peft_model(tiny_bert(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    for name, p in m.named_parameters():       # the head's gradient norm is nearly the same for every example:
        if "classifier" in name:                # train only the prompt, so that clipping bites on some examples
            p.requires_grad_(False)
    return m


def peft_prompt_gpt2() -> nn.Module:
    return peft.get_peft_model(tiny_gpt2(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def soft_prompt_bert() -> nn.Module:
    m = SoftPromptModel(tiny_bert(), num_virtual_tokens=4)
    m.base.classifier.weight.requires_grad_(True)          # train the head with the prompt
    m.base.classifier.bias.requires_grad_(True)
    return m


def soft_prompt_gpt2() -> nn.Module:
    return SoftPromptModel(tiny_gpt2(), num_virtual_tokens=4)


class Items(torch.utils.data.Dataset):
    """n copies of example-shaped dicts (content is irrelevant where only the size matters)."""

    def __init__(self, n: int) -> None:
        self.b, self.n = batch(), n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i % B] for k, v in self.b.items()}


def flat(params: list[nn.Parameter], grad: bool = False) -> torch.Tensor:
    return torch.cat([(p.grad if grad else p.detach()).flatten().clone() for p in params])


@pytest.mark.parametrize("build,loss_fn", [
    (lora_bert, cls_loss), (lora_gpt2, lm_loss), (prefix_gpt2, lm_loss), (prefix_bert, cls_loss),
    (soft_prompt_bert, cls_loss), (soft_prompt_gpt2, lm_loss), (peft_prompt_bert, cls_loss),
    (peft_prompt_gpt2, lm_loss),
], ids=["lora-bert", "lora-gpt2", "prefix-gpt2", "prefix-bert", "softprompt-bert", "softprompt-gpt2",
        "peft-prompt-bert", "peft-prompt-gpt2"])
def test_dp_step_equals_mean_of_clipped_per_example_gradients(build, loss_fn) -> None:
    model = build().train()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    b = batch()
    grads = []
    for i in range(B):                                     # reference: plain autograd, one example at a time
        model.zero_grad()
        loss_fn(model, {k: v[i:i + 1] for k, v in b.items()}).backward()
        grads.append(flat(params, grad=True))
    g = torch.stack(grads)
    norms = g.norm(dim=1)
    clip = float(norms.median())
    expected = (g * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).mean(0)
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    assert not torch.allclose(expected, g.mean(0), rtol=1e-2)  # clipping per example matters here
    model.zero_grad(set_to_none=True)

    lr = 0.5
    ldp = LocalDP(PrivacySection(mode="local", noise_multiplier=0.0, max_grad_norm=clip),
                  dataset_size=2 * B, batch_size=B, total_steps=10, seed=0)
    model, opt, _ = ldp.make_private(model, torch.optim.SGD(params, lr=lr), DataLoader(Items(2 * B)))
    before, frozen_before = flat(params), flat(frozen)
    opt.zero_grad()
    loss_fn(model, b).backward()
    assert all(p.grad_sample.shape[0] == B for p in params)
    assert not any(hasattr(p, "grad_sample") for p in frozen)   # the frozen base is not touched by Opacus
    opt.step()
    ldp.release()
    update = (before - flat(params)) / lr
    roundoff = 4 * torch.finfo(torch.float32).eps * float(before.abs().max()) / lr  # of (before - after) / lr
    torch.testing.assert_close(update, expected, rtol=2e-4, atol=2e-4 * float(expected.abs().max()) + roundoff)
    assert torch.equal(flat(frozen), frozen_before)
    assert ldp.steps == 1 and not hasattr(model, "autograd_grad_sample_hooks")
    assert "get_prompt" not in vars(model)                 # release() restores peft's own prompt path


def test_peft_prompt_tuning_breaks_per_example_gradients() -> None:
    """Why SoftPrompt exists: peft computes the prompt for a batch of 1 and repeats it."""
    model = peft.get_peft_model(tiny_bert(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).train()
    hooks = GradSampleHooks(model)
    cls_loss(model, batch()).backward()
    emb = model.prompt_encoder["default"].embedding.weight
    assert emb.grad_sample.shape[0] == 1 != B             # one summed gradient, not B per-example ones
    hooks.cleanup()


@pytest.mark.parametrize("task", ["cls", "lm"])
def test_soft_prompt_model_matches_peft_prompt_tuning(task: str) -> None:
    base = tiny_bert() if task == "cls" else tiny_gpt2()
    tt = "SEQ_CLS" if task == "cls" else "CAUSAL_LM"
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=tt, num_virtual_tokens=4)).eval()
    ours = SoftPromptModel(base, 4, init=pm.prompt_encoder["default"].embedding.weight).eval()
    b = batch()
    labels = b["y"] if task == "cls" else b["labels"]
    with torch.no_grad():
        ref = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
        out = ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def _linear_setup(noise: float, clip: float, n: int = 100, bs: int = 10, seed: int = 0):
    torch.manual_seed(0)
    model = nn.Linear(200, 100)
    x, y = torch.randn(n, 200), torch.randn(n, 100)
    ds = torch.utils.data.TensorDataset(x, y)
    ldp = LocalDP(PrivacySection(mode="local", noise_multiplier=noise, max_grad_norm=clip),
                  dataset_size=n, batch_size=bs, total_steps=100, seed=seed)
    model, opt, loader = ldp.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(ds))
    return model, opt, loader, ldp, (x[:bs], y[:bs])


def test_local_noise_std_is_sigma_c_over_expected_batch() -> None:
    sigma, clip, bs = 1.3, 0.7, 10
    updates = []
    for noise in (0.0, sigma):                              # same batch, same start: the difference is the noise
        model, opt, _, ldp, (x, y) = _linear_setup(noise, clip, bs=bs)
        before = flat(list(model.parameters()))
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y, reduction="none").mean(1).mean().backward()
        opt.step()
        updates.append(flat(list(model.parameters())) - before)
        ldp.release()
    noise_part = (updates[1] - updates[0]).double()          # lr = 1
    # 20100 coordinates: the sample std has a relative error of ~0.5 %; allow 3 %
    assert noise_part.std().item() == pytest.approx(sigma * clip / bs, rel=0.03)
    assert abs(noise_part.mean().item()) < 5 * sigma * clip / bs / noise_part.numel() ** 0.5


def test_poisson_loader_empty_batches_and_accounting() -> None:
    ldp = LocalDP(PrivacySection(mode="local", noise_multiplier=1.0), dataset_size=50, batch_size=1,
                  total_steps=40, seed=0)
    model = nn.Linear(50, 40)
    ds = torch.utils.data.TensorDataset(torch.randn(50, 50), torch.randn(50, 40))
    model, opt, loader = ldp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds), steps=40)
    sizes = []
    for item in loader:
        opt.zero_grad()
        if item is None:
            sizes.append(0)
            ldp.empty_step(opt)                           # noise-only step, still accounted
            continue
        sizes.append(len(item[0]))
        nn.functional.mse_loss(model(item[0]), item[1]).backward()
        opt.step()
    ldp.release()
    assert len(sizes) == 40 and 0 in sizes and max(sizes) >= 1
    assert ldp.steps == 40 and ldp.sample_rate == 1 / 50
    ref = RDPAccountant()
    ref.history = [(1.0, 1 / 50, 40)]
    assert ldp.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    # mean batch size is q * N = B
    model = nn.Linear(50, 40)
    ldp3 = LocalDP(PrivacySection(mode="local"), dataset_size=400, batch_size=20, total_steps=100, seed=1)
    _, _, loader3 = ldp3.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                      DataLoader(torch.utils.data.TensorDataset(torch.zeros(400, 1))), steps=100)
    mean_size = sum(len(i[0]) for i in loader3 if i is not None) / 100
    ldp3.release()
    assert mean_size == pytest.approx(20, abs=2.0)


def test_state_round_trip_continues_epsilon_across_rounds() -> None:
    def run(ldp: LocalDP, steps: int) -> None:
        model = nn.Linear(4, 2)
        ds = torch.utils.data.TensorDataset(torch.randn(100, 4), torch.randn(100, 2))
        model, opt, loader = ldp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds),
                                              steps=steps)
        for item in loader:
            opt.zero_grad()
            if item is None:
                ldp.empty_step(opt)
                continue
            nn.functional.mse_loss(model(item[0]), item[1]).backward()
            opt.step()
        ldp.release()

    cfg = PrivacySection(mode="local", noise_multiplier=0.9)
    straight = LocalDP(cfg, dataset_size=100, batch_size=10, total_steps=30)
    run(straight, 10)
    run(straight, 10)
    run(straight, 10)
    client = LocalDP(cfg, dataset_size=100, batch_size=10, total_steps=30)
    run(client, 10)
    saved = json.dumps(client.state_dict())                    # round 1 ends; state persists as JSON
    for _ in range(2):
        client = LocalDP(cfg, dataset_size=100, batch_size=10, total_steps=30)
        client.load_state_dict(json.loads(saved))
        run(client, 10)
        saved = json.dumps(client.state_dict())
    assert client.steps == 30
    assert client.epsilon() == straight.epsilon()
    assert 0 < client.epsilon() < float("inf")


def test_target_epsilon_sets_the_noise_for_the_whole_run() -> None:
    cfg = PrivacySection(mode="local", target_epsilon=3.0, delta=1e-5)
    ldp = LocalDP(cfg, dataset_size=200, batch_size=16, total_steps=60)
    acc = RDPAccountant()
    acc.history = [(ldp.noise_multiplier, 16 / 200, 60)]
    assert 3.0 - 0.05 < acc.get_epsilon(1e-5) <= 3.0
    with pytest.raises(PrivacyError, match="unreachable"):
        derive_noise_multiplier(0.001, 1e-5, 0.5, 10_000)


def test_a_client_never_takes_more_steps_than_its_target_epsilon_was_planned_for() -> None:
    """Found by an outside review: past the planned steps (a resumed deployment retraining rounds, FedBuff
    dispatching a fast client more often than there are server rounds) DP-SGD only warned, and with the
    client's epsilon hidden nobody saw the target exceeded. Under a target the client now declines the round."""
    cfg = PrivacySection(mode="local", target_epsilon=3.0, delta=1e-5)
    ldp = LocalDP(cfg, dataset_size=100, batch_size=10, total_steps=4)
    ds = torch.utils.data.TensorDataset(torch.randn(100, 5), torch.randn(100, 1))
    model = nn.Linear(5, 1)
    for _ in range(2):  # two rounds of 2 steps: the plan
        model, opt, loader = ldp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds),
                                              steps=2)
        for batch in loader:
            if batch is not None:
                torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
            opt.step()
            opt.zero_grad()
        ldp.release()
    assert ldp.steps == 4 and ldp.epsilon() <= 3.0
    with pytest.raises(PrivacyError, match=r"privacy budget spent: 4 of the 4 DP-SGD steps planned for "
                                           r"privacy.target_epsilon = 3 are taken, 2 more would exceed it"):
        ldp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds), steps=2)
    given = LocalDP(PrivacySection(mode="local", noise_multiplier=1.0), dataset_size=100, batch_size=10,
                    total_steps=4)
    given._accountant.history = [(1.0, 0.1, 4)]  # no target: the client may go on (its epsilon just grows)
    other = nn.Linear(5, 1)
    given.make_private(other, torch.optim.SGD(other.parameters(), lr=0.1), DataLoader(ds), steps=2)
    given.release()


def test_delta_is_checked_against_the_clients_own_dataset() -> None:
    """The server checks delta < 1/n against the scenario's partitions; a deployed node's own data file can be
    smaller, so the node checks it too (found by an outside review: n = 50 trained at delta = 0.05)."""
    with pytest.raises(PrivacyError, match=r"privacy.delta = 0.05 is >= 1/N = 1/50 \(this client's dataset"):
        LocalDP(PrivacySection(mode="local", delta=0.05), dataset_size=50, batch_size=10, total_steps=5)


def test_make_private_rejects_misuse() -> None:
    model = lora_bert()
    ds = DataLoader(Items(12))
    ldp = LocalDP(PrivacySection(mode="local"), dataset_size=12, batch_size=4, total_steps=3)
    with pytest.raises(PrivacyError, match="frozen"):
        ldp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), ds)     # includes the frozen base
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(PrivacyError, match="not in the optimizer"):
        ldp.make_private(model, torch.optim.SGD(params[:2], lr=0.1), ds)
    ia3 = peft.get_peft_model(tiny_bert(), peft.IA3Config(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                          feedforward_modules=[]))
    with pytest.raises(PrivacyError, match="ia3_l"):     # IA3 vectors live in a ParameterDict: no hook fires
        ldp.make_private(ia3, torch.optim.SGD([p for p in ia3.parameters() if p.requires_grad], lr=0.1), ds)
    with pytest.raises(PrivacyError, match="planned for 12"):
        ldp.make_private(model, torch.optim.SGD(params, lr=0.1), DataLoader(Items(13)))
    ldp.make_private(model, torch.optim.SGD(params, lr=0.1), ds)
    other = LocalDP(PrivacySection(mode="local"), dataset_size=12, batch_size=4, total_steps=3)
    with pytest.raises(PrivacyError, match="already has Opacus hooks"):
        other.make_private(model, torch.optim.SGD(params, lr=0.1), ds)                 # shared base model
    ldp.release()
    other.make_private(model, torch.optim.SGD(params, lr=0.1), ds)                    # fine after release
    other.release()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
