"""Damaged or inconsistent model files: each is one clear UserError naming what is wrong, never a wrong model
loaded in silence (a duplicate tensor, an integer weight, a config that yields NaN) nor a library's traceback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import jaxmap
from jaxmap.config import ModelConfig
from jaxmap.disk_tier import write_safetensors
from jaxmap.errors import UserError
from jaxmap.loading.safetensors_source import SafetensorsSource

TINY = Path(__file__).parent / "data" / "tiny-llama"
BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": 0}, "rope_theta must be a positive number"),
    ({"hidden_size": True}, "hidden_size must be a positive integer"),
    ({"num_attention_heads": 3}, "hidden_size 64 is not divisible by num_attention_heads 3; set head_dim"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
])
def test_config_values_that_would_give_nan_or_wrong_shapes(change, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.from_hf_dict({**BASE, **change})
    ModelConfig.from_hf_dict({**BASE, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16})


def copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


def test_config_that_is_not_utf8(tmp_path):
    folder = copy_tiny(tmp_path)
    (folder / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    with pytest.raises(UserError, match="not valid JSON: it is not UTF-8 text"):
        SafetensorsSource(folder)


def test_fewer_config_layers_than_the_checkpoint_is_warned(tmp_path, caplog):
    folder = copy_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with caplog.at_level(logging.WARNING, logger="jaxmap.api"):
        model = jaxmap.load(str(folder), max_seq_len=32, progress=False, devices="0")
    assert model.config.num_hidden_layers == 2
    assert "holds 2 layers' tensors beyond the config's num_hidden_layers=2 (layers 2-3)" in caplog.text


def unindexed(tmp_path: Path) -> Path:
    folder = copy_tiny(tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    return folder


def test_a_tensor_in_two_files_without_an_index(tmp_path):
    folder = unindexed(tmp_path)
    write_safetensors({"model.norm.weight": np.zeros(128, np.float32)}, folder / "zzz-extra.safetensors")
    with pytest.raises(UserError, match="'model.norm.weight' appears in both .* and zzz-extra.safetensors"):
        SafetensorsSource(folder)


def test_integer_weights_are_refused_not_cast(tmp_path):
    folder = unindexed(tmp_path)
    source = SafetensorsSource(folder)
    tensors = {n: source.read(n) for n in source.names()}
    source.close()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    tensors["model.norm.weight"] = np.ones(128, np.int32)
    write_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match="'model.norm.weight' is stored as I32"):
        jaxmap.load(str(folder), max_seq_len=32, progress=False, devices="0")


def test_index_naming_a_file_outside_the_folder_or_not_json(tmp_path):
    folder = copy_tiny(tmp_path)
    shutil.copy(folder / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside the model folder"):
        SafetensorsSource(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        SafetensorsSource(folder)


def test_gguf_of_an_unsupported_version(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "v9.gguf"
    w = GGUFWriter(str(path), arch="llama")
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = bytearray(path.read_bytes())
    raw[4:8] = (9).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="GGUF version 9, which jaxmap does not read"):
        jaxmap.load(str(path), progress=False)


def test_truncated_orbax_checkpoint_is_one_line(tmp_path):
    from jaxmap.checkpoint import convert
    from jaxmap.loading import open_source

    source = open_source(TINY)
    try:
        out = Path(convert(source, tmp_path / "ckpt", None, progress=False))
    finally:
        source.close()
    for f in (out / "params" / "layer_00001").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(UserError, match=r"is truncated or corrupt \(params/layer_00001.*convert it again"):
        jaxmap.load(str(out), max_seq_len=32, progress=False, devices="0")


def test_a_damaged_offload_layer_is_written_again(tmp_path, caplog):
    """The disk tier's folder is jaxmap's own cache: a truncated layer file is rebuilt with a warning, and the model
    computes as before, instead of failing every later run."""
    from test_offload import caps

    config = ModelConfig.from_preset("tiny")
    kwargs = dict(max_seq_len=64, progress=False, max_memory=caps(config, 1, 0), offload_folder=tmp_path)
    first = jaxmap.load("preset:tiny", **kwargs)
    want = first.forward_logits([[1, 5, 9, 2]])[0]
    (layer,) = [p for p in tmp_path.rglob("layer-0003.safetensors")]
    layer.write_bytes(layer.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="jaxmap.disk_tier"):
        again = jaxmap.load("preset:tiny", **kwargs)
    assert "is damaged" in caplog.text and "writing it again" in caplog.text
    np.testing.assert_array_equal(again.forward_logits([[1, 5, 9, 2]])[0], want)
