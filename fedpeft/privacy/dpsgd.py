"""Local (record-level) DP-SGD on a client with Opacus: per-example clipping, Gaussian noise, Poisson sampling.

:class:`LocalDP` is the client's DP state for the whole run. Each round::

    ldp = LocalDP(cfg.privacy, dataset_size=len(train_set), batch_size=B, total_steps=rounds * steps)
    ldp.load_state_dict(saved)                        # the client's accountant, if any (plain JSON)
    model.train()
    model, optimizer, loader = ldp.make_private(model, optimizer, DataLoader(train_set, collate_fn=...),
                                                steps=steps)
    for batch in loader:                              # exactly `steps` Poisson batches
        optimizer.zero_grad()
        if batch is None:                             # Poisson sampling drew no example
            ldp.empty_step(optimizer)                 # noise-only step, still accounted
            continue
        loss = mean_over_examples(model(**batch))     # causal LM: causal_lm_loss(logits, labels)
        loss.backward()
        optimizer.step()                              # clip per example, sum, + N(0, (sigma*C)^2), / B
    ldp.release()                                     # remove the hooks (the base model may be shared)
    saved = ldp.state_dict(); eps = ldp.epsilon()

The model is *not* wrapped (Opacus' ``wrap_model=False`` hooks): the caller keeps using its own
(peft) model for forward passes and adapter state extraction. Only parameters with
``requires_grad=True`` (adapter + head) get per-example gradients; the optimizer must hold exactly
those. The sampling rate is ``q = B / N`` (exact), the expected batch size ``B``; the loss must be a
*mean over examples* of per-example losses (Hugging Face's causal-LM loss averages over all tokens of
the batch, which couples examples: use :func:`causal_lm_loss`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fedpeft.config import PrivacySection
from fedpeft.errors import PrivacyError
from fedpeft.privacy.accounting import compute_epsilon, history_from_json, history_to_json, make_accountant
from fedpeft.privacy.checks import check_delta
from fedpeft.privacy.soft_prompt import per_example_prompts  # (importing it registers the SoftPrompt sampler)

log = logging.getLogger(__name__)

#: Above this noise multiplier a target epsilon is treated as unreachable (the noise would swamp the signal).
MAX_NOISE_MULTIPLIER = 100.0


def derive_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                            accountant: str = "rdp") -> float:
    """Noise multiplier reaching ``(target_epsilon, delta)`` after ``steps`` Poisson steps at rate ``q``.

    Raises :class:`PrivacyError` if it would have to exceed :data:`MAX_NOISE_MULTIPLIER`.
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise PrivacyError(f"cannot derive a noise multiplier from target_epsilon={target_epsilon}, "
                           f"delta={delta}, sample_rate={sample_rate}, steps={steps}")
    acc = make_accountant(accountant)
    acc.history = [(MAX_NOISE_MULTIPLIER, sample_rate, steps)]
    with warnings.catch_warnings():  # opacus: "optimal order is the largest alpha" at large noise, expected
        warnings.simplefilter("ignore", UserWarning)
        eps_at_max = compute_epsilon(acc, delta)
        if eps_at_max > target_epsilon:
            raise PrivacyError(
                f"target epsilon {target_epsilon:g} is unreachable: even noise multiplier {MAX_NOISE_MULTIPLIER:g} "
                f"gives epsilon {eps_at_max:.3g} over {steps} steps at sampling rate {sample_rate:.4g} "
                f"(delta {delta:g}). Raise the target, train fewer rounds or local steps, or use more data per "
                "client.")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def per_example_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example next-token loss ``(B,)``: mean over each example's own labelled tokens.

    Labels use -100 for ignored positions. If ``logits`` is longer than ``labels`` (a soft prompt was
    prepended) the labels are left-padded with -100. Examples without labelled tokens get loss 0.
    """
    if logits.shape[1] > labels.shape[1]:
        pad = torch.full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100,
                         dtype=labels.dtype, device=labels.device)
        labels = torch.cat([pad, labels], dim=1)
    shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
    token_loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="none")
    mask = (shift_labels != -100).to(token_loss.dtype)
    token_loss = token_loss.view(shift_labels.shape) * mask
    return token_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch loss for DP-SGD: the mean over examples of :func:`per_example_causal_lm_loss`."""
    return per_example_causal_lm_loss(logits, labels).mean()


def _collate_or_none(collate_fn: Any) -> Any:
    def collate(items: list[Any]) -> Any:
        return collate_fn(items) if items else None
    return collate


class LocalDP:
    """The client's DP-SGD configuration and accountant, persisted across rounds as plain JSON."""

    def __init__(self, cfg: PrivacySection, dataset_size: int, batch_size: int, total_steps: int,
                 *, seed: int | None = None, max_epsilon: float = 0.0) -> None:
        if dataset_size < 1 or batch_size < 1 or total_steps < 1:
            raise PrivacyError(f"LocalDP needs dataset_size, batch_size and total_steps >= 1, got "
                               f"{dataset_size}, {batch_size}, {total_steps}")
        if not cfg.max_grad_norm > 0:
            raise PrivacyError(f"privacy.max_grad_norm must be > 0 for DP-SGD, got {cfg.max_grad_norm}")
        self.kind = cfg.accountant
        self.delta = cfg.delta
        self.max_grad_norm = float(cfg.max_grad_norm)
        self.physical_batch_size = int(cfg.physical_batch_size)
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.total_steps = int(total_steps)
        self.target_epsilon = float(cfg.target_epsilon)  # > 0: a client never takes more than total_steps
        self.max_epsilon = float(max_epsilon)  # > 0: the node's own limit (node config max-epsilon)
        check_delta(cfg.delta, dataset_size, "this client's dataset, record-level DP")  # a node's own data
        self.sample_rate = min(1.0, batch_size / dataset_size)
        self.expected_batch_size = self.sample_rate * dataset_size
        if cfg.target_epsilon > 0:
            self.noise_multiplier = derive_noise_multiplier(cfg.target_epsilon, cfg.delta, self.sample_rate,
                                                            self.total_steps, cfg.accountant)
            log.info("DP-SGD: noise multiplier %.4g reaches epsilon %g over %d steps (q=%.4g, delta=%g)",
                     self.noise_multiplier, cfg.target_epsilon, total_steps, self.sample_rate, cfg.delta)
        else:
            self.noise_multiplier = float(cfg.noise_multiplier)
        if self.noise_multiplier == 0:
            log.warning("DP-SGD with noise multiplier 0: clipping only, epsilon is infinite")
        self.seed = seed
        if seed is not None:
            warnings.warn("DP-SGD noise is seeded: anyone who knows the seed can remove it (simulation only)",
                          stacklevel=2)  # shown once per process, not once per client and round
        self._accountant = make_accountant(cfg.accountant)
        #: a test-only hook: the noise actually added is divided by this (the epsilon audit must catch it)
        self.noise_divisor = 1.0
        self._hooks: GradSampleHooks | None = None
        self._undo_prompts: Callable[[], None] = lambda: None

    @property
    def steps(self) -> int:
        """DP-SGD steps accounted so far (over all rounds)."""
        return sum(n for _, _, n in self._accountant.history)

    def _generator(self, salt: int) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed((self.seed * 1_000_003 + self.steps * 7 + salt) % (2**63))
        return gen

    def _check_params(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not trainable:
            raise PrivacyError("the model has no trainable parameters")
        if in_opt - trainable:
            raise PrivacyError("the optimizer holds parameters that are frozen or not in the model; "
                               "build it from [p for p in model.parameters() if p.requires_grad]")
        if trainable - in_opt:
            raise PrivacyError("some trainable parameters are not in the optimizer; their gradients would "
                               "escape clipping and noise")
        unhookable = [f"{mname}.{pname}" for mname, mod in model.named_modules()
                      if isinstance(mod, (nn.ParameterDict, nn.ParameterList))
                      for pname, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if unhookable:
            raise PrivacyError(
                "DP-SGD cannot compute per-example gradients for trainable parameters held in a "
                "ParameterDict/ParameterList (e.g. peft IA3's ia3_l): that container has no forward of its own "
                f"for Opacus to hook. Offending: {', '.join(unhookable[:3])}"
                f"{' ...' if len(unhookable) > 3 else ''}. Use LoRA, prefix tuning or the SoftPrompt for DP-SGD.")

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                     *, steps: int | None = None) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Attach per-example gradient hooks, wrap the optimizer, and Poisson-sample the data.

        Returns ``(model, dp_optimizer, dp_loader)``: the *same* model object (hooks attached, not
        wrapped), an Opacus ``DPOptimizer`` (use it instead of ``optimizer``), and a loader yielding
        ``steps`` Poisson batches (default ``1 / q``); an empty draw is yielded as ``None``.
        """
        n_steps = steps if steps is not None else max(1, int(round(1 / self.sample_rate)))
        if self.target_epsilon > 0 and self.steps + n_steps > self.total_steps:
            raise PrivacyError(f"privacy budget spent: {self.steps} of the {self.total_steps} DP-SGD steps planned for "
                               f"privacy.target_epsilon = {self.target_epsilon:g} are taken, {n_steps} more would "
                               "exceed it: this client declines the round")
        if self.max_epsilon > 0 and (after := self.epsilon_after(n_steps)) > self.max_epsilon:
            raise PrivacyError(f"this node's privacy limit: {n_steps} more DP-SGD steps would take its epsilon to "
                               f"{after:.3g}, above its max-epsilon {self.max_epsilon:g} (node config): declined")
        if self._hooks is not None:
            self.release()
        if hasattr(model, "autograd_grad_sample_hooks"):
            raise PrivacyError("the model already has Opacus hooks attached: release() the other LocalDP first")
        if isinstance(data_loader, DPDataLoader):
            raise PrivacyError("pass the plain data loader; LocalDP does the Poisson sampling itself")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        dataset = data_loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        if n != self.dataset_size:
            raise PrivacyError(f"data loader has {n} examples but LocalDP was planned for {self.dataset_size}; "
                               "the sampling rate and noise would be wrong")
        self._check_params(model, optimizer)
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise PrivacyError("model is not compatible with DP-SGD: " + "; ".join(map(str, errors)))
        try:
            self._hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as e:
            raise PrivacyError(f"model is not compatible with per-example gradients: {e}") from None
        self._hooks.forbid_grad_accumulation()
        self._undo_prompts = per_example_prompts(model)  # peft prompt tuning: per-example prompt lookups
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier / self.noise_divisor,
                                   max_grad_norm=self.max_grad_norm,
                                   expected_batch_size=self.expected_batch_size,
                                   loss_reduction="mean", generator=self._generator(1))
        dp_optimizer.attach_step_hook(self._charge_step)
        sampler = UniformWithReplacementSampler(num_samples=self.dataset_size, sample_rate=self.sample_rate,
                                                generator=self._generator(2), steps=n_steps)
        dp_loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_or_none(data_loader.collate_fn),
                               num_workers=0)
        if self.steps + n_steps > self.total_steps:  # a given noise multiplier: epsilon grows past the plan
            log.warning("DP-SGD will run %d steps in total, more than the %d planned", self.steps + n_steps,
                        self.total_steps)
        return model, dp_optimizer, dp_loader

    def _charge_step(self, optimizer: DPOptimizer) -> None:
        """Charge one DP-SGD step to the accountant at the configured noise and rate (Opacus calls it after
        each noisy step: once per sampled batch, however many physical chunks it was split into)."""
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def physical_batches(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The Poisson-sampled (logical) ``batch`` as chunks of at most ``privacy.physical_batch_size`` examples
        (one chunk when 0): run forward and backward per chunk, :meth:`accumulate` after every chunk but the last,
        and step the optimizer after the last (Opacus' BatchMemoryManager, without its data loader)."""
        sizes = {v.shape[0] for v in batch.values()}
        if len(sizes) != 1:
            raise PrivacyError(f"cannot split a batch whose tensors hold {sorted(sizes)} examples")
        n, size = sizes.pop(), self.physical_batch_size
        if size <= 0 or n <= size:
            return [dict(batch)]
        return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]

    @staticmethod
    def accumulate(optimizer: DPOptimizer) -> None:
        """After a chunk's backward pass that is not the logical batch's last: clip its per-example gradients into
        the batch's sum, without noise, step or accounting (those come once, with the last chunk)."""
        optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # per-example gradients only: the clipped sum is kept

    def empty_step(self, optimizer: DPOptimizer) -> None:
        """Take a noise-only step for an empty Poisson batch (skipping it would leak that it was empty)."""
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()

    def release(self) -> None:
        """Remove Opacus' hooks and per-example attributes from the model (idempotent)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        self._undo_prompts()
        self._undo_prompts = lambda: None

    def epsilon_after(self, steps: int) -> float:
        """The epsilon this client would have spent after ``steps`` more DP-SGD steps (at the configured delta)."""
        ahead = make_accountant(self.kind)
        ahead.history = [*self._accountant.history, (self.noise_multiplier, self.sample_rate, steps)]
        return compute_epsilon(ahead, self.delta)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far over all rounds at ``delta`` (default: the configured delta)."""
        return compute_epsilon(self._accountant, self.delta if delta is None else delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: accountant history and the parameters it was computed with."""
        return {"kind": self.kind, "history": history_to_json(self._accountant.history),
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the accountant so the reported epsilon covers all earlier rounds."""
        if state.get("kind") != self.kind:
            raise PrivacyError(f"local accountant state is for {state.get('kind')!r}, configured {self.kind!r}")
        self._accountant.history = history_from_json(state.get("history"))
        if (state.get("noise_multiplier"), state.get("sample_rate")) != (self.noise_multiplier, self.sample_rate):
            log.warning("restored DP-SGD state used noise %s / rate %s, now %s / %s; the history keeps both",
                        state.get("noise_multiplier"), state.get("sample_rate"), self.noise_multiplier,
                        self.sample_rate)

