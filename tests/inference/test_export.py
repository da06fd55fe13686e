"""`export_model`: the merged folder loads with vanilla transformers and computes what base + adapters
computed (one adapter, two stacked, sharded), a reward model scores the same after export, and the
destination rules (no silent overwrite, nothing half-written) hold; test_export_destination.py has the rest."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tunesmith.errors import TunesmithError
from tunesmith.inference.export import export_model
from tunesmith.model.adapters import apply_adapters, save_adapter
from tunesmith.model.init_model import init_model
from tunesmith.model.loading import load_model, load_tokenizer
from tunesmith.model.lora import inject_lora, lora_modules
from tunesmith.model.reward_model import RewardModel
from tunesmith.model.value_head import ValueHead, save_value_head
from tunesmith.training.configure import build_config

CPU = torch.device("cpu")
INPUT_IDS = torch.tensor([[5, 9, 17, 3, 250, 1000, 42], [7, 7, 7, 8, 9, 10, 11]])
ENDOFTEXT, IM_END = "<|endoftext|>", "<|im_end|>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny Qwen2 folder whose generation_config, like base Qwen2's, stops only at <|endoftext|>."""
    folder = init_model(tmp_path_factory.mktemp("export") / "tiny", arch="qwen2", size="tiny", seed=0)
    endoftext = load_tokenizer(str(folder)).convert_tokens_to_ids(ENDOFTEXT)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": endoftext}))
    return str(folder)


def random_adapter(base: str, folder: Path, targets, seed: int) -> str:
    """A LoRA adapter folder as training writes it (adapter + tokenizer), with non-zero B weights."""
    model = load_model(base, torch.float32, CPU)
    inject_lora(model, targets, rank=4, alpha=8)
    torch.manual_seed(seed)
    for _, module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    save_adapter(model, folder, base, 4, 8, 0.0, targets, False)
    load_tokenizer(base).save_pretrained(folder)
    return str(folder)


def export(tmp_path: Path, base: str, adapters: list[str], **settings) -> Path:
    raw = {"model_name_or_path": base, "adapter_name_or_path": adapters, "export_dir": str(tmp_path / "merged"),
           **settings}
    lines = []
    path = export_model(build_config(raw, command="export"), say=lines.append)
    assert lines[-1].endswith(str(path)) and len(lines) >= 3
    return path


def reference_logits(base: str, adapters: list[str]) -> torch.Tensor:
    """tunesmith's own base + adapters, the last one live (unmerged) as during training."""
    model = load_model(base, torch.float32, CPU).eval()
    if adapters:
        apply_adapters(model, adapters, trainable_last=False)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def vanilla_logits(folder: Path) -> torch.Tensor:
    """The exported folder through plain transformers, with no missing or unexpected weights."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits


def tensor_dtypes(folder: Path) -> dict[str, str]:
    dtypes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            dtypes |= {key: f.get_slice(key).get_dtype() for key in f.keys()}
    return dtypes


def test_lora_export_loads_in_vanilla_transformers_with_the_same_logits(base, tmp_path):
    adapter = random_adapter(base, tmp_path / "sft", "all", seed=1)
    folder = export(tmp_path, base, [adapter])
    expected = reference_logits(base, [adapter])
    assert not torch.allclose(expected, reference_logits(base, []), atol=1e-2)  # the adapter matters
    torch.testing.assert_close(vanilla_logits(folder), expected, atol=1e-4, rtol=0)
    keys = tensor_dtypes(folder)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not [key for key in keys if "lora" in key or "base_layer" in key]
    assert set(keys.values()) == {"F32"}  # infer_dtype auto: the base's config.json says float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.pad_token == ENDOFTEXT
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])  # base eos kept, end of turn added


def test_stacked_adapters_export_as_base_plus_both(base, tmp_path):
    first = random_adapter(base, tmp_path / "a", ["q_proj", "v_proj"], seed=2)
    second = random_adapter(base, tmp_path / "b", "all", seed=3)
    folder = export(tmp_path, base, [first, second])
    expected = reference_logits(base, [first, second])
    assert not torch.allclose(expected, reference_logits(base, [second]), atol=1e-2)  # the first one matters
    torch.testing.assert_close(vanilla_logits(folder), expected, atol=1e-4, rtol=0)


def test_a_small_export_size_writes_shards_that_load_the_same(base, tmp_path):
    adapter = random_adapter(base, tmp_path / "sft", "all", seed=4)
    folder = export(tmp_path, base, [adapter], export_size=0.0001)  # 100 kB shards
    shards = sorted(folder.glob("model-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    torch.testing.assert_close(vanilla_logits(folder), reference_logits(base, [adapter]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_reward_model_exports_as_a_full_reward_model(base, tmp_path, kind):
    if kind == "lora":
        folder = Path(random_adapter(base, tmp_path / "rm", "all", seed=5))
    else:  # a full fine-tuning rm output: a model folder with the head beside it
        folder = tmp_path / "rm"
        shutil.copytree(base, folder)
    torch.manual_seed(6)
    save_value_head(ValueHead(64), folder)
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": base, "cutoff_len": 64}))
    exported = export(tmp_path, base, [str(folder)]) if kind == "lora" else export(tmp_path, str(folder), [])
    assert (exported / "value_head.safetensors").is_file()
    assert yaml.safe_load((exported / "train_config.yaml").read_text())["cutoff_len"] == 64
    conversations = [[{"role": "user", "content": "Describe the river."}, {"role": "assistant", "content": text}]
                     for text in ("The river is calm.", "The river is cold, grey.", "Rivers.")]
    before = RewardModel.load(folder, dtype=torch.float32).score(conversations)
    after = RewardModel.load(exported, dtype=torch.float32).score(conversations)
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), atol=1e-4, rtol=0)


def test_bf16_export_writes_bf16_tensors(base, tmp_path):
    folder = export(tmp_path, base, [], infer_dtype="bfloat16")
    assert set(tensor_dtypes(folder).values()) == {"BF16"}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_non_empty_export_dir_is_refused_and_left_alone(base, tmp_path):
    """Even with overwrite_output_dir: export never deletes files it did not write (see test_export_destination)."""
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_text("the user's")
    with pytest.raises(TunesmithError, match="holds no earlier tunesmith export"):
        export(tmp_path, base, [], overwrite_output_dir=True)
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["model.safetensors"]
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left


def test_an_export_dir_holding_an_input_is_refused(base, tmp_path):
    adapter = random_adapter(base, tmp_path / "merged" / "sft", "all", seed=7)
    with pytest.raises(TunesmithError, match="which this export reads"):
        export(tmp_path, base, [adapter], overwrite_output_dir=True)


def test_a_failure_midway_leaves_no_export_folder(base, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(GenerationConfig, "save_pretrained", fail)  # after some weights are written
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path, base, [])
    assert list(tmp_path.iterdir()) == []
