"""Results usable outside fedpeft: the run's adapter in plain transformers + peft, and ``fedpeft export --merge``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from fedpeft import cli, export, lora, models
from fedpeft.config import ModelSection
from fedpeft.errors import FedPeftError
from fedpeft.runtime import get_runtime
from fedpeft.simulation import runner

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["apple banana today", "rain and snow with some wind", "the truck engine"]


def doc_blocks() -> list[str]:
    """The python blocks of docs/export.md, in order (the tests run them as written)."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "export.md").read_text(), re.S)


def local_model(tmp_path: Path, arch: str) -> Path:
    """A tiny model saved as a user's own local model directory (weights, config, tokenizer)."""
    path = tmp_path / f"local-{arch}"
    if arch == "gpt2":
        mcfg = AutoConfig.for_model("gpt2", vocab_size=261, n_embd=32, n_layer=2, n_head=4, bos_token_id=3,
                                    eos_token_id=3, pad_token_id=0)
        model = AutoModelForCausalLM.from_config(mcfg)
    elif arch == "llama":  # a decoder: its own classification head is `score`, without a bias
        mcfg = AutoConfig.for_model("llama", vocab_size=261, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=64, bos_token_id=2, eos_token_id=3,
                                    pad_token_id=0)
        model = AutoModel.from_config(mcfg)
    else:
        mcfg = AutoConfig.for_model("bert", vocab_size=261, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, pad_token_id=0)
        model = AutoModel.from_config(mcfg)
    model.save_pretrained(str(path))
    models.byte_tokenizer().save_pretrained(str(path))
    return path


def plain_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter that cannot import fedpeft and may not download; its last stdout line
    is JSON. Fails if fedpeft got imported anyway."""
    code += "\nimport sys\nassert not [m for m in sys.modules if m.startswith('fedpeft')]\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    blocker = cwd / "no_fedpeft"  # an installed (editable) fedpeft must not be found either
    blocker.mkdir(exist_ok=True)
    (blocker / "fedpeft.py").write_text("raise ImportError('fedpeft must not be imported here')\n")
    env["PYTHONPATH"] = str(blocker)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def own_logits(cfg, run_dir: Path, texts: list[str]) -> torch.Tensor:  # noqa: ANN001 - a Config
    """fedpeft's own model with the run's final global adapter (from the checkpoint), on ``texts``."""
    rt = get_runtime(cfg)
    models.set_adapter_state(rt.model, load_file(str(run_dir / "checkpoint" / "global.safetensors")))
    correction = run_dir / "adapter" / lora.CORRECTION_FILE  # exact LoRA aggregation's part of the model
    lora.set_correction(rt.model, load_file(str(correction)) if correction.exists() else {})
    batch = rt.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return rt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize(("arch", "pooling"), [("bert", "mean"), ("bert", "model"), ("llama", "mean")])
def test_adapter_loads_in_plain_peft_with_the_documented_lines(tiny_cfg, tmp_path, arch, pooling, one_thread):
    base = local_model(tmp_path, arch)
    cfg = tiny_cfg(**{"model.name": str(base), "model.pooling": pooling, "federation.rounds": 1,
                      "train.local_steps": 4})
    run_dir = runner.simulate(cfg)
    adapter = run_dir / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base.resolve())
    assert sorted(conf["modules_to_save"]) == ["classifier", "score"]
    assert (adapter / "pooling_head.safetensors").exists() == (pooling == "mean")

    load, mean_head = doc_blocks()[:2]
    head = mean_head if pooling == "mean" else "logits = model(**batch).logits\n"
    got = plain_python(f"ADAPTER = {str(adapter)!r}\ntexts = {TEXTS!r}\n{load}{head}\nimport json\n"
                       "print(json.dumps({'logits': logits.tolist(), "
                       "'names': [model.config.id2label[i] for i in logits.argmax(-1).tolist()]}))", tmp_path)
    want = own_logits(cfg, run_dir, TEXTS)
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-5), (got["logits"], want)
    names = get_runtime(cfg).examples.label_names
    assert got["names"] == [names[i] for i in want.argmax(-1).tolist()]


def test_causal_adapter_loads_with_auto_peft_causal_lm(tiny_cfg, qa_data, tmp_path, one_thread):
    base = local_model(tmp_path, "gpt2")
    cfg = tiny_cfg(**{"model.name": str(base), "model.task": "causal_lm", "data.path": str(qa_data),
                      "federation.rounds": 1, "train.local_steps": 4})
    run_dir = runner.simulate(cfg)
    adapter = run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    load = doc_blocks()[2]
    got = plain_python(f"ADAPTER = {str(adapter)!r}\n{load}\nimport json, torch\n"
                       f"batch = tokenizer({TEXTS!r}, padding=True, return_tensors='pt')\n"
                       "with torch.no_grad():\n    logits = model(**batch).logits\n"
                       "print(json.dumps({'logits': logits.tolist()}))", tmp_path)
    want = own_logits(cfg, run_dir, TEXTS)
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-5)


def test_base_reference_is_resolvable(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_packaged_model"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.PACKAGED_MODELS, "fake-packaged", ("fake_packaged_model", "model", "", "pip ..."))
    assert export.base_reference(ModelSection(name="fake-packaged")) == str((package / "model").resolve())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert export.base_reference(ModelSection(name="mine")) == str(tmp_path / "mine")  # relative -> absolute
    assert export.base_reference(ModelSection(name="org/some-model")) == "org/some-model"  # a hub name
    assert export.base_reference(ModelSection(name="tiny-bert")) is None


@pytest.mark.parametrize(("pooling", "adapter", "lora_aggregation"),
                         [("model", "lora", "naive"), ("mean", "lora", "naive"), ("mean", "ia3", "naive"),
                          ("mean", "lora", "exact")])
def test_export_merge_gives_the_unmerged_outputs_in_plain_transformers(tiny_cfg, tmp_path, capsys, pooling,
                                                                      adapter, lora_aggregation, one_thread):
    cfg = tiny_cfg(**{"model.pooling": pooling, "adapter.type": adapter, "federation.rounds": 1,
                      "train.local_steps": 4, "federation.lora_aggregation": lora_aggregation})
    run_dir = runner.simulate(cfg)
    correction = run_dir / "adapter" / lora.CORRECTION_FILE
    assert correction.exists() == (lora_aggregation == "exact")
    assert not correction.exists() or any(v.abs().sum() > 0 for v in load_file(str(correction)).values())
    want = own_logits(cfg, run_dir, TEXTS)
    trained = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    initial = get_runtime(cfg).initial_state
    assert any(not torch.equal(v, initial[k]) for k, v in trained.items() if "classifier" not in k)  # to fold in
    out = tmp_path / "merged"
    assert cli.main(["export", str(run_dir), "--merge", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"merged_dir": str(out)}
    batch = get_runtime(cfg).tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        if pooling == "model":
            merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
            assert not any("lora" in n for n, _ in merged.named_parameters())
            got = merged(**batch).logits
            assert merged.config.id2label == dict(enumerate(get_runtime(cfg).examples.label_names))
        else:
            hidden = AutoModel.from_pretrained(str(out)).eval()(**batch).last_hidden_state
            head = load_file(str(out / "pooling_head.safetensors"))
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            got = torch.nn.functional.linear((hidden * mask).sum(1) / mask.sum(1), head["weight"], head["bias"])
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_export_merge_of_a_causal_run(tiny_cfg, qa_data, tmp_path, one_thread):
    cfg = tiny_cfg(**{"model.name": "tiny-gpt2", "model.task": "causal_lm", "data.path": str(qa_data),
                      "federation.rounds": 1, "train.local_steps": 4})
    run_dir = runner.simulate(cfg)
    want = own_logits(cfg, run_dir, TEXTS)
    out = export.export_merged(run_dir)
    assert out == run_dir / "merged"
    batch = get_runtime(cfg).tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(**batch).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("adapter", ["prompt", "prefix"])
def test_export_refuses_adapters_that_cannot_merge(tiny_cfg, tmp_path, adapter, capsys):
    cfg = tiny_cfg(**{"adapter.type": adapter})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(cfg.to_toml())
    with pytest.raises(FedPeftError, match=f"cannot merge a '{adapter}' adapter"):
        export.export_merged(run_dir)
    assert cli.main(["export", str(run_dir), "--merge"]) != 0
    assert f"'{adapter}' adapter" in capsys.readouterr().err
    assert not (run_dir / "merged").exists()


def test_export_refuses_a_remote_split_run_with_only_the_client_side(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.toml").write_text(tiny_cfg().to_toml())
    (run_dir / "adapter" / export.SPLIT_CLIENT_FILE).write_bytes(b"")
    with pytest.raises(FedPeftError, match="only the split client's part"):
        export.export_merged(run_dir)
    with pytest.raises(FedPeftError, match="not a fedpeft run directory"):
        export.export_merged(run_dir / "adapter")


def test_an_architecture_without_a_classification_class_keeps_the_run_alive(tiny_cfg, monkeypatch):
    rt = get_runtime(tiny_cfg(**{"model.name": "tiny-llama"}))
    head = rt.model.get_base_model()
    assert export._arch_head(head) == ("score", False)  # a decoder's own head

    def missing(*args: object, **kwargs: object) -> None:
        raise ValueError("Unrecognized configuration class for this kind of AutoModel")

    monkeypatch.setattr("transformers.AutoModelForSequenceClassification.from_config", missing)
    assert export._arch_head(head) == ("classifier", True)
