"""Damaged or inconsistent model files: each is one clear UserError naming what is wrong, never a wrong model
loaded in silence (a duplicate tensor, an integer weight, a config that yields NaN) nor a library's traceback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxmap
from jaxmap.errors import UserError
from jaxmap.families import config_from_hf, preset_config
from jaxmap.loading.safetensors_source import SafetensorsSource
from jaxmap.materialize.disk_tier import write_safetensors

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-llama"
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
        config_from_hf({**BASE, **change})
    config_from_hf({**BASE, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16})


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
    from gguf_files import write_gguf

    path = write_gguf(tmp_path / "v9.gguf", {"token_embd.weight": np.ones((8, 4), np.float32)})
    raw = bytearray(path.read_bytes())
    raw[4:8] = (9).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="GGUF version 9, which jaxmap does not read"):
        jaxmap.load(str(path), progress=False)


def test_truncated_orbax_checkpoint_is_one_line(tmp_path):
    from jaxmap.loading import open_source
    from jaxmap.materialize.checkpoint_writer import convert

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

    config = preset_config("tiny")
    kwargs = dict(max_seq_len=64, progress=False, max_memory=caps(config, 1, 0), offload_folder=tmp_path)
    first = jaxmap.load("preset:tiny", **kwargs)
    want = first.forward_logits([[1, 5, 9, 2]])[0]
    (layer,) = [p for p in tmp_path.rglob("layer-0003.safetensors")]
    layer.write_bytes(layer.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="jaxmap.materialize.disk_tier"):
        again = jaxmap.load("preset:tiny", **kwargs)
    assert "is damaged" in caplog.text and "writing it again" in caplog.text
    np.testing.assert_array_equal(again.forward_logits([[1, 5, 9, 2]])[0], want)


def run_module(module: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_cli_says_a_non_utf8_config_in_one_line(tmp_path):
    folder = copy_tiny(tmp_path)
    (folder / "config.json").write_bytes(b"\xff\xfe{}")
    for args in (["jaxmap.plan"], ["jaxmap.generate", "-p", "hi", "--max-new-tokens", "1"]):
        out = run_module(*args, "-m", str(folder))
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"error: {folder}/config.json is not valid JSON: it is not UTF-8 text", out.stderr


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 64.5}, "hidden_size must be a positive integer, got 64.5"),
    ({"rope_scaling": "yes"}, "rope_scaling must be an object"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling.factor must be a positive number .* got None"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}},
     "low_freq_factor .4. must be below high_freq_factor"),
])
def test_config_values_that_would_be_truncated_or_give_nan_frequencies(change, message):
    with pytest.raises(UserError, match=message):
        config_from_hf({**BASE, **change})
    assert config_from_hf({**BASE, "hidden_size": 64.0}).hidden_size == 64


def test_a_hugging_face_cache_snapshot_of_symlinks_is_not_outside_its_folder(tmp_path):
    """The index check is by name: a hub cache snapshot's files are symlinks into ../blobs, and are its own."""
    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in TINY.iterdir():
        shutil.copy(file, tmp_path / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("..") / "blobs" / file.name)
    with SafetensorsSource(snapshot) as source:
        assert "model.norm.weight" in source.names()


def one_block(writer) -> None:
    """A llama GGUF's block count, which the loader reads first."""
    writer.add_block_count(1)


def test_truncated_gguf_names_the_tensor_and_its_bytes(tmp_path):
    from gguf_files import write_gguf

    tensors = {"token_embd.weight": np.ones((64, 16), np.float32), "output_norm.weight": np.ones(16, np.float32)}
    path = write_gguf(tmp_path / "cut.gguf", tensors, metadata=one_block)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) - 16 * 4 - 16 * 4 * 10])  # the last 10 rows of token_embd and output_norm gone
    size = path.stat().st_size
    with pytest.raises(UserError) as info:
        jaxmap.load(str(path), progress=False)
    message = str(info.value)
    assert "is truncated or corrupt: tensor token_embd.weight (F32) needs 4096 bytes from byte" in message
    assert f"but only 3456 are there (the file has {size} bytes" in message
    assert "reshape" not in message and "array" not in message


def test_gguf_cut_inside_its_metadata_says_so(tmp_path):
    from gguf_files import write_gguf

    path = write_gguf(tmp_path / "head.gguf", {"token_embd.weight": np.ones((8, 4), np.float32)}, metadata=one_block)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match=r"is truncated or corrupt: it ends inside its metadata, at entry \d+ of the "
                                        r"\d+ its header lists \(the file has 40 bytes\)"):
        jaxmap.load(str(path), progress=False)


def test_the_gguf_versions_are_those_of_the_installed_reader():
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    from jaxmap.loading.gguf_source import readable_versions

    assert readable_versions() == tuple(sorted(READER_SUPPORTED_VERSIONS))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from jaxmap.loading import open_source
    from jaxmap.materialize.checkpoint_writer import convert

    source = open_source(TINY)
    try:
        return Path(convert(source, tmp_path_factory.mktemp("ck") / "tiny", None, progress=False))
    finally:
        source.close()


def damaged_copy(ckpt: Path, tmp_path: Path, damage) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(ckpt, out)
    damage(out)
    return out


def set_meta(**changes):
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "jaxmap_checkpoint.json").read_text())
        meta.update(changes)
        (folder / "jaxmap_checkpoint.json").write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_bytes(b"\xff{}"), "config.json is not valid JSON: it is not UTF-8 text"),
    (lambda f: (f / "config.json").write_text("[]"), "config.json must hold a JSON object"),
    (lambda f: (f / "jaxmap_checkpoint.json").write_text("[1]"), "is not a jaxmap checkpoint"),
    (lambda f: (f / "jaxmap_checkpoint.json").write_text("{"), r"jaxmap_checkpoint.json is not valid JSON \(line 1"),
    (set_meta(version="2"), r"is damaged \(version '2' is not a number\)"),
    (set_meta(items=None), r"is damaged \(its items are not outer and layer_NNNNN\)"),
    (set_meta(items=["outer", "../../elsewhere"]), "its items are not outer and layer_NNNNN"),
    (set_meta(tensors={"model.norm.weight": {"item": "outer"}}), "the entry for 'model.norm.weight' is incomplete"),
], ids=["config-not-utf8", "config-list", "meta-list", "meta-not-json", "version-str", "no-items", "item-path",
        "entry"])
def test_damaged_checkpoint_metadata_is_one_line(tiny_ckpt, tmp_path, damage, message):
    from jaxmap.loading.orbax_checkpoint import OrbaxSource

    with pytest.raises(UserError, match=message):
        OrbaxSource(damaged_copy(tiny_ckpt, tmp_path, damage))


def test_a_damaged_checkpoint_leaves_no_orbax_tracebacks_behind(tiny_ckpt, tmp_path):
    """When one of an item's reads fails, orbax's other reads fail in background threads; their tracebacks must not
    follow the one-line error (they did in about two runs of three)."""
    def damage(folder: Path) -> None:
        for f in (folder / "params").rglob("ocdbt.process_0/d/*"):
            f.write_bytes(b"")

    folder = damaged_copy(tiny_ckpt, tmp_path, damage)
    out = run_module("jaxmap.generate", "-q", "-m", str(folder), "-p", "hi", "--max-new-tokens", "1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: {folder} is truncated or corrupt (params/outer: ")
    assert len(out.stderr.splitlines()) == 1, out.stderr
    script = ("import gc, sys, jaxmap\n"
              "for _ in range(6):\n"
              "    try:\n"
              "        jaxmap.load(sys.argv[1], max_seq_len=32, progress=False, devices='0')\n"
              "    except jaxmap.UserError:\n"
              "        gc.collect()\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="")
    again = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env,
                           timeout=240)
    assert again.returncode == 0 and again.stderr == "", again.stderr  # six failed loads, not one traceback


def test_orbax_info_lines_stay_out_of_jaxmap_logs(tmp_path, caplog):
    """orbax logs every save and restore through absl at INFO (760 lines for one conversion of SmolLM2); they are
    kept for jaxmap's DEBUG."""
    from jaxmap.loading import open_source
    from jaxmap.materialize.checkpoint_writer import convert

    absl = logging.getLogger("absl")

    def absl_lines(out: Path, level: int) -> int:
        caplog.clear()
        with caplog.at_level(level), open_source(TINY) as source:
            convert(source, out, None, progress=False)
            jaxmap.load(str(out), max_seq_len=32, progress=False, devices="0")
        assert absl.level == logging.NOTSET  # put back as it was
        return sum(r.name.startswith(("absl", "orbax")) for r in caplog.records)

    before = absl.level
    absl.setLevel(logging.NOTSET)  # as in a program that configured nothing (a CLI run in-process may have)
    try:
        assert absl_lines(tmp_path / "info", logging.INFO) == 0
        assert absl_lines(tmp_path / "debug", logging.DEBUG) > 0
    finally:
        absl.setLevel(before)


def test_an_offload_layer_of_the_wrong_shape_is_written_again(tmp_path, caplog):
    from test_offload import caps

    from jaxmap.loading.safetensors_source import parse_header

    config = preset_config("tiny")
    kwargs = dict(max_seq_len=64, progress=False, max_memory=caps(config, 1, 0), offload_folder=tmp_path)
    want = jaxmap.load("preset:tiny", **kwargs).forward_logits([[1, 5, 9, 2]])[0]
    (layer,) = tmp_path.rglob("layer-0003.safetensors")
    entries, _ = parse_header(layer)
    name = "model.layers.3.input_layernorm.weight"
    write_safetensors({**{n: np.zeros(e.shape, np.float32) for n, e in entries.items()},
                       name: np.zeros(3, np.float32)}, layer)
    with caplog.at_level(logging.WARNING, logger="jaxmap.materialize.disk_tier"):
        again = jaxmap.load("preset:tiny", **kwargs)
    assert f"{name} has shape (3,), not" in caplog.text
    np.testing.assert_array_equal(again.forward_logits([[1, 5, 9, 2]])[0], want)
