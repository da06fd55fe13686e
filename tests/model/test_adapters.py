"""PEFT-format adapter I/O checked against the real `peft` package in both directions, adapter stacking,
and the errors a user sees for a wrong or unsupported adapter folder."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapters, load_adapter, save_adapter
from tunesmith.model.lora import inject_lora, lora_modules, lora_parameters

INPUT_IDS = torch.arange(2 * 9).reshape(2, 9) % 128

# (architecture, target_modules here, target_modules in PEFT, use_rslora)
CASES = [
    ("qwen2", ["q_proj", "v_proj"], ["q_proj", "v_proj"], False),
    ("llama", ["k_proj", "o_proj", "up_proj"], ["k_proj", "o_proj", "up_proj"], True),
    ("qwen2", "all", "all-linear", True),
]


def randomise_lora_B(model: nn.Module, seed: int) -> None:
    """Give every lora_B (ours or PEFT's) random values so the adapter actually changes the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def save_tunesmith_adapter(model, out_dir, targets, use_rslora=False, seed=1, rank=4, alpha=8):
    inject_lora(model, targets, rank=rank, alpha=alpha, use_rslora=use_rslora)
    randomise_lora_B(model, seed)
    save_adapter(model, out_dir, "tiny", rank, alpha, 0.0, targets, use_rslora)
    return model


@pytest.mark.parametrize("arch,targets,peft_targets,use_rslora", CASES)
def test_tunesmith_adapter_loads_in_peft(make_tiny_model, tmp_path, arch, targets, peft_targets, use_rslora):
    model = save_tunesmith_adapter(make_tiny_model(arch), tmp_path, targets, use_rslora)
    peft_model = PeftModel.from_pretrained(make_tiny_model(arch), tmp_path).eval()
    expected = model(INPUT_IDS).logits
    assert not torch.allclose(expected, make_tiny_model(arch)(INPUT_IDS).logits, atol=1e-3)
    torch.testing.assert_close(peft_model(INPUT_IDS).logits, expected, atol=1e-5, rtol=0)
    adapted = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert adapted == {name for name, _ in lora_modules(model)}


@pytest.mark.parametrize("arch,targets,peft_targets,use_rslora", CASES)
def test_peft_adapter_loads_here(make_tiny_model, tmp_path, arch, targets, peft_targets, use_rslora):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, use_rslora=use_rslora, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(make_tiny_model(arch), config).eval()
    randomise_lora_B(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path)
    model = make_tiny_model(arch)
    loaded = load_adapter(model, tmp_path, trainable=False)
    assert loaded["r"] == 4 and loaded["use_rslora"] == use_rslora
    torch.testing.assert_close(model(INPUT_IDS).logits, peft_model(INPUT_IDS).logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_all_selects_the_same_layers_as_peft_all_linear(make_tiny_model):
    ours = inject_lora(make_tiny_model(), "all", rank=2, alpha=4)
    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_tiny_model(), config)
    theirs = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert set(ours) == theirs


def test_saved_files_use_peft_names_and_config(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, "all", use_rslora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 14
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_trainable_resumes_training(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["q_proj"])
    model = make_tiny_model()
    load_adapter(model, tmp_path, trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4 and {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}


def test_apply_adapters_merges_all_but_the_last(make_tiny_model, tmp_path):
    first, second = tmp_path / "sft", tmp_path / "dpo"
    save_tunesmith_adapter(make_tiny_model(), first, "all", seed=3)
    save_tunesmith_adapter(make_tiny_model(), second, ["q_proj", "v_proj"], use_rslora=True, seed=4)
    # Reference built with PEFT alone: merge the first adapter into the base, then put the second on top.
    merged_first = PeftModel.from_pretrained(make_tiny_model(), first).merge_and_unload()
    expected = PeftModel.from_pretrained(merged_first, second).eval()(INPUT_IDS).logits

    model = make_tiny_model()
    config = apply_adapters(model, [str(first), str(second)], trainable_last=True)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    torch.testing.assert_close(model(INPUT_IDS).logits, expected, atol=1e-5, rtol=0)
    assert [n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)] == ["q_proj", "v_proj"] * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.{proj}.{ab}.weight"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in ("lora_A", "lora_B")
    }


def test_apply_adapters_frozen_last(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["q_proj"])
    model = make_tiny_model()
    apply_adapters(model, [str(tmp_path)], trainable_last=False)
    assert not any(p.requires_grad for p in model.parameters())


def rewrite_tensors(adapter_dir, edit) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def rewrite_config(adapter_dir, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_tensor_is_named_and_model_untouched(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["q_proj"])
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    rewrite_tensors(tmp_path, lambda t: t.pop(key))
    model = make_tiny_model()
    with pytest.raises(TunesmithError, match=f"lacks tensor {key}"):
        load_adapter(model, tmp_path, trainable=True)
    assert not list(lora_modules(model))


def test_extra_tensor_is_named(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["q_proj"])
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    rewrite_tensors(tmp_path, lambda t: t.update({key: torch.zeros(4, 128)}))
    with pytest.raises(TunesmithError, match=f"has tensor {key}"):
        load_adapter(make_tiny_model(), tmp_path, trainable=True)


def test_wrong_shape_is_named(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["v_proj"])
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    rewrite_tensors(tmp_path, lambda t: t.update({key: torch.zeros(32, 4)}))  # v_proj outputs 16, not 32
    with pytest.raises(TunesmithError, match=rf"{key} has shape \(32, 4\) but this model needs \(16, 4\)"):
        load_adapter(make_tiny_model(), tmp_path, trainable=True)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"use_dora": True}, "use_dora = True"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"target_modules": ".*proj"}, "regular expression"),
    ],
)
def test_unsupported_config_is_named(make_tiny_model, tmp_path, changes, message):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["q_proj"])
    rewrite_config(tmp_path, **changes)
    with pytest.raises(TunesmithError, match=message):
        load_adapter(make_tiny_model(), tmp_path, trainable=False)


def test_bin_only_adapter_is_refused_without_unpickling(make_tiny_model, tmp_path):
    save_tunesmith_adapter(make_tiny_model(), tmp_path, ["q_proj"])
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle: loading it would crash")
    with pytest.raises(TunesmithError, match="convert it once"):
        load_adapter(make_tiny_model(), tmp_path, trainable=False)


def test_missing_config_is_reported(make_tiny_model, tmp_path):
    with pytest.raises(TunesmithError, match="No adapter_config.json"):
        load_adapter(make_tiny_model(), tmp_path, trainable=False)
