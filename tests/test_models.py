"""Base models and adapters: every adapter type on every tiny architecture, state handling, peft reload."""

import pytest
import torch
from peft import PeftModel

from fedpeft import config, models
from fedpeft.errors import ModelError

X = ["apple rain today", "engine wheel"]


def _model(name, task, adapter, **extra):
    cfg = config.load(None, [f"model.name={name}", f"model.task={task}", f"adapter.type={adapter}",
                             "model.tiny_hidden_size=32", "data.source=file", "data.path=x.jsonl"]
                      + [f"{k}={v}" for k, v in extra.items()])
    base = models.load_base_model(cfg.model, num_labels=3 if task == "classification" else 0, seed=1)
    return cfg, base, models.build_peft_model(base, cfg.adapter, task, seed=1)


def _batch(task):
    tok = models.byte_tokenizer()
    enc = tok(X, return_tensors="pt", padding=True)
    enc["labels"] = torch.tensor([0, 2]) if task == "classification" else enc["input_ids"].clone()
    return enc


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix", "ia3"])
@pytest.mark.parametrize("name, task", [("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm"),
                                        ("tiny-llama", "causal_lm")])
def test_adapter_trains_only_its_own_tensors(name, task, adapter):
    cfg, base, model = _model(name, task, adapter)
    state = models.adapter_state(model)
    assert state, "no trainable tensors"
    assert sum(v.numel() for v in state.values()) < 0.5 * sum(p.numel() for p in model.parameters())
    out = model(**_batch(task))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_seeded_init_is_reproducible_and_state_round_trips():
    _, _, a = _model("tiny-bert", "classification", "lora")
    _, _, b = _model("tiny-bert", "classification", "lora")
    sa, sb = models.adapter_state(a), models.adapter_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    shifted = models.add(sa, {k: torch.ones_like(v) for k, v in sa.items()})
    models.set_adapter_state(a, shifted)
    assert all(torch.equal(models.adapter_state(a)[k], shifted[k]) for k in sa)
    assert all(torch.allclose(models.subtract(shifted, sa)[k], torch.ones_like(sa[k])) for k in sa)


def test_set_adapter_state_rejects_mismatches():
    _, _, m = _model("tiny-bert", "classification", "lora")
    state = models.adapter_state(m)
    key = next(iter(state))
    with pytest.raises(ModelError, match="missing"):
        models.set_adapter_state(m, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ModelError, match="shape"):
        models.set_adapter_state(m, {**state, key: torch.zeros(1)})


@pytest.mark.parametrize("adapter", ["lora", "prompt"])
def test_saved_adapter_reloads_with_peft(tmp_path, adapter):
    cfg, _, model = _model("tiny-bert", "classification", adapter)
    state = {k: v + 0.01 for k, v in models.adapter_state(model).items()}
    models.save_adapter(model, state, tmp_path / "adapter")
    fresh = models.load_base_model(cfg.model, num_labels=3, seed=1)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    model.eval()
    batch = _batch("classification")
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)


def test_unknown_model_is_a_clear_error():
    cfg = config.load(None, ["model.name=no-such-org/no-such-model"])
    with pytest.raises(ModelError, match="cannot load model 'no-such-org/no-such-model'.*built-in"):
        models.load_tokenizer(cfg.model)


@pytest.mark.parametrize("field, value", [("hidden_size", "abc"), ("num_hidden_layers", [2]),
                                          ("layer_norm_eps", "small")])
def test_a_wrong_typed_field_in_a_model_directory_exits_2_in_one_line(tmp_path, cls_data, capsys, field, value):
    """A local model directory whose config.json holds a field of the wrong type: exit 2, one line naming it."""
    import json

    from transformers import AutoConfig, AutoModel

    from fedpeft import cli

    from conftest import tiny_overrides

    tok = models.byte_tokenizer()
    mcfg = AutoConfig.for_model("bert", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)
    AutoModel.from_config(mcfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    raw = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**raw, field: value}))
    sets = tiny_overrides(cls_data, tmp_path / "runs", **{"model.name": str(tmp_path / "model")})
    capsys.readouterr()
    assert cli.main(["simulate", *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the run's banner
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"field '{field}'" in errors[0] and "cannot load model" in errors[0]


def test_packaged_minilm_loads_offline():
    cfg = config.load(None)
    tok = models.load_tokenizer(cfg.model)
    base = models.load_base_model(cfg.model, num_labels=5)
    model = models.build_peft_model(base, cfg.adapter, "classification")
    names = list(models.adapter_state(model))
    assert any("query.lora_A" in n for n in names) and any("value.lora_B" in n for n in names)
    enc = tok(["markets rallied"], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "model"])
def test_prefix_tuning_refused_exactly_where_peft_cannot_pass_prefixes(pooling):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``: peft then refuses prefixes on an architecture's
    own classification head. fedpeft must refuse exactly those combinations up front and train the others."""
    import peft

    cfg = config.load(None, ["model.name=tiny-bert", f"model.pooling={pooling}", "adapter.type=prefix",
                             "model.tiny_hidden_size=32", "data.source=file", "data.path=x.jsonl"])
    plain = peft.get_peft_model(models.load_base_model(cfg.model, num_labels=3, seed=1),
                                peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    try:
        plain(**_batch("classification"))
        peft_passes_prefixes = True
    except ValueError:
        peft_passes_prefixes = False
    if pooling != "model":
        assert peft_passes_prefixes, "fedpeft's pooling head must accept prefixes on every supported version"
    base = models.load_base_model(cfg.model, num_labels=3, seed=1)
    if not peft_passes_prefixes:
        with pytest.raises(ModelError, match="model.pooling = 'mean' or 'cls'"):
            models.build_peft_model(base, cfg.adapter, "classification", seed=1)
        return
    model = models.build_peft_model(base, cfg.adapter, "classification", seed=1)
    model(**_batch("classification")).loss.backward()
    prefix = [p for n, p in model.named_parameters() if "prompt_encoder" in n]
    assert prefix and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix)


@pytest.mark.parametrize("name, task, key", [("tiny-bert", "classification", "attention_probs_dropout_prob"),
                                             ("tiny-gpt2", "causal_lm", "attn_pdrop"),
                                             ("tiny-llama", "causal_lm", "attention_dropout")])
def test_attention_dropout_sets_the_models_own_key_and_minus_one_keeps_it(name, task, key) -> None:
    own = getattr(_model(name, task, "lora")[1].config, key)
    assert own == (0.0 if name == "tiny-llama" else 0.1)  # the architectures' defaults
    for p in (0.0, 0.3):
        base = _model(name, task, "lora", **{"model.attention_dropout": p})[1]
        assert getattr(base.config, key) == p
    if name == "tiny-bert":  # what the attention layers use while training
        drops = [m.dropout.p for n, m in base.named_modules() if n.endswith("attention.self")]
        assert drops and set(drops) == {0.3}


def test_attention_dropout_out_of_range_or_on_a_model_without_it_is_refused(monkeypatch) -> None:
    with pytest.raises(config.ConfigError, match=r"model.attention_dropout = -0.5: use -1"):
        _model("tiny-bert", "classification", "lora", **{"model.attention_dropout": -0.5})
    monkeypatch.setattr(models, "ATTENTION_DROPOUT_KEYS", ("no_such_key",))
    with pytest.raises(ModelError, match="has none of no_such_key; leave it at -1"):
        _model("tiny-bert", "classification", "lora", **{"model.attention_dropout": 0.0})
    _model("tiny-bert", "classification", "lora")  # -1 (the default) never looks
