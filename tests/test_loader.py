"""Checkpoint folders: real configs and index files, sharded and single weights, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch

import dengine.models.loader as loader
from checkpoints import MASK_ID, REAL, write_checkpoint
from dengine import CheckpointError, load_model, read_model_config


def _index_names(family: str) -> set[str]:
    return set(json.loads((REAL[family] / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("family,count", [("llada", 291), ("dream", 339)])
def test_layout_resolves_every_tensor_of_the_real_index(family, count):
    model_cls, config = read_model_config(REAL[family])
    with torch.device("meta"):
        model = model_cls(config)
    layout = model.checkpoint_layout()
    sources = {name for parts in layout.values() for name, _ in parts}
    assert sources == _index_names(family)
    assert len(sources) == count
    params = dict(model.named_parameters())
    assert set(layout) == set(params)
    for param_name, parts in layout.items():
        assert sum(rows for _, rows in parts) == params[param_name].shape[0]


def test_real_configs_parse_with_ids_from_config_and_generation_config():
    _, llada = read_model_config(REAL["llada"])
    assert (llada.hidden_size, llada.num_layers, llada.num_heads, llada.num_kv_heads) == (4096, 32, 32, 32)
    assert (llada.head_dim, llada.intermediate_size, llada.vocab_size) == (128, 12288, 126464)
    assert (llada.mask_token_id, llada.eos_token_id, llada.pad_token_id, llada.bos_token_id) == (126336, 126081, 126081, 126080)
    assert llada.rope_in_fp32 and llada.logit_shift == 0 and not llada.qkv_bias and llada.rope_theta == 500000.0
    _, dream = read_model_config(REAL["dream"])
    assert (dream.hidden_size, dream.num_layers, dream.num_heads, dream.num_kv_heads) == (3584, 28, 28, 4)
    assert (dream.mask_token_id, dream.eos_token_id, dream.pad_token_id) == (151666, 151643, 151643)
    assert not dream.rope_in_fp32 and dream.logit_shift == 1 and dream.qkv_bias and dream.rms_norm_eps == 1e-6


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("shards", [1, 3])
def test_loads_single_and_sharded_weights_in_requested_dtype(tmp_path, family, shards, seed):
    folder, sd = write_checkpoint(tmp_path, family, seed=seed, shards=shards, dtype=torch.bfloat16)
    model = load_model(folder, dtype="float32")
    assert model.config.mask_token_id == MASK_ID
    assert next(model.parameters()).dtype == torch.float32
    embed_name = "model.transformer.wte.weight" if family == "llada" else "model.embed_tokens.weight"
    assert torch.equal(model.embed.weight, sd[embed_name].to(torch.bfloat16).float())
    q_name = "model.transformer.blocks.1.q_proj.weight" if family == "llada" else "model.layers.1.self_attn.q_proj.weight"
    q_rows = sd[q_name].shape[0]
    assert torch.equal(model.layers[1].attn.qkv_proj.weight[:q_rows], sd[q_name].to(torch.bfloat16).float())
    assert load_model(folder, dtype="bfloat16").embed.weight.dtype == torch.bfloat16
    expected = torch.bfloat16 if loader.cpu_computes_bf16() else torch.float32  # a tiny model's fp32 weights fit
    assert load_model(folder).embed.weight.dtype == expected


def test_auto_dtype_is_bf16_where_computed_else_fp32_when_it_leaves_room(monkeypatch):
    """"auto": bf16 on GPUs and on CPUs with bf16 hardware; on a CPU without, fp32 unless fp32 weights would
    take more than half the free memory (a full-size checkpoint on a 24 GB machine), then bf16."""
    monkeypatch.setattr(loader, "available_memory_bytes", lambda device: 24 << 30)
    for hardware, params, expected in ((True, 5_000_000, torch.bfloat16), (False, 5_000_000, torch.float32),
                                       (False, 3 << 30, torch.float32), (False, (3 << 30) + 1, torch.bfloat16),
                                       (False, 8_000_000_000, torch.bfloat16)):
        monkeypatch.setattr(loader, "cpu_computes_bf16", lambda hardware=hardware: hardware)
        assert loader.auto_dtype(params, torch.device("cpu")) == expected, (hardware, params)
    monkeypatch.setattr(loader, "cpu_computes_bf16", lambda: False)
    assert loader.auto_dtype(5_000_000, torch.device("cuda")) == torch.bfloat16
    for family in ("llada", "dream"):  # the full-size configs (8.0B and 7.6B weights) stay bf16 on 24 GB
        model_class, config = read_model_config(REAL[family])
        with torch.device("meta"):
            params = sum(p.numel() for p in model_class(config).parameters())
        assert params > 7e9 and loader.auto_dtype(params, torch.device("cpu")) == torch.bfloat16


def test_bf16_asked_for_on_a_cpu_that_emulates_it_warns_and_loads_bf16(tmp_path, monkeypatch, caplog):
    """An explicit bf16 on a CPU without bf16 hardware loads bf16 (as asked) and says it will be slow;
    fp32, "auto" and a CPU with the hardware stay silent."""
    folder, _ = write_checkpoint(tmp_path, "llada", seed=0)
    for hardware, dtype, warns in ((False, "bfloat16", True), (False, "float32", False), (False, "auto", False),
                                   (True, "bfloat16", False)):
        monkeypatch.setattr(loader, "cpu_computes_bf16", lambda hardware=hardware: hardware)
        caplog.clear()
        with caplog.at_level("WARNING", logger=loader.logger.name):
            model = load_model(folder, dtype=dtype)
        said = [r.getMessage() for r in caplog.records if "no bf16 hardware" in r.getMessage()]
        assert bool(said) == warns, (hardware, dtype, said)
        if warns:
            assert next(model.parameters()).dtype == torch.bfloat16 and "'auto' picks fp32" in said[0]


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if the loader reads any weight data (bad folders must fail before loading)."""
    real_safe_open = loader.safe_open

    class Guard:
        def __init__(self, *args, **kwargs):
            self._handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            handle = self._handle.__enter__()

            class Wrapped:
                def __getattr__(self, name):
                    if name == "get_tensor":
                        raise AssertionError("weights were read before the folder was validated")
                    return getattr(handle, name)

            return Wrapped()

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

    monkeypatch.setattr(loader, "safe_open", Guard)


def test_unknown_model_type(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed)
    _edit_json(folder / "config.json", model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config.json.*model_type 'gpt2' is not supported"):
        load_model(folder)


def test_unsupported_architecture_flag_is_named(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed)
    _edit_json(folder / "config.json", weight_tying=True)
    with pytest.raises(CheckpointError, match="weight_tying=True is not supported"):
        load_model(folder)


def test_missing_config_and_broken_json(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "dream", seed=seed)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not readable as JSON"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "nowhere")


def test_missing_required_field(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "dream", seed=seed)
    data = json.loads((folder / "config.json").read_text())
    del data["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'mask_token_id' is missing"):
        load_model(folder)


def test_missing_shard(tmp_path, seed, no_tensor_reads):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: shard listed in"):
        load_model(folder)


def test_no_weights_at_all(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed, shards=1)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(folder)


def _rewrite_single(folder, mutate):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_wrong_shape_names_the_tensor(tmp_path, seed, no_tensor_reads):
    folder, _ = write_checkpoint(tmp_path, "dream", seed=seed, shards=1)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_single(folder, lambda t: t.__setitem__(name, torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=rf"{name}' has shape \[3, 64\], expected \[32, 64\]"):
        load_model(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path, seed, no_tensor_reads):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed, shards=1)
    name = "model.transformer.blocks.0.up_proj.weight"
    _rewrite_single(folder, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_model(folder)
    _rewrite_single(folder, lambda t: t.update({name: torch.zeros(96, 64), "extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="tensor 'extra.weight' that a llada model does not use"):
        load_model(folder)


def test_index_pointing_at_wrong_shard(tmp_path, seed, no_tensor_reads):
    folder, _ = write_checkpoint(tmp_path, "dream", seed=seed, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][name])
    index["weight_map"][name] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name}' is listed in model.safetensors.index.json but not stored"):
        load_model(folder)


def test_bad_dtype_name(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_model(folder, dtype="int8")


def test_special_ids_outside_vocab(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed)
    _edit_json(folder / "config.json", mask_token_id=126336)
    with pytest.raises(CheckpointError, match="mask_token_id 126336 is outside the vocabulary"):
        load_model(folder)


def test_a_model_larger_than_free_memory_is_refused_before_any_weight_is_allocated(tmp_path, monkeypatch, seed):
    folder, _ = write_checkpoint(tmp_path, "llada", seed=seed)
    monkeypatch.setattr(loader, "available_memory_bytes", lambda device: 1000)
    allocated = []
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: allocated.append(self))
    with pytest.raises(MemoryError, match=r"the weights take .* GB in torch.float32 but only 0.00 GB of cpu memory"):
        load_model(folder, dtype="float32")
    assert not allocated
