"""Host and disk tiers at run time on virtual CPU devices: same tokens as all-on-device, planned bytes equal to
what is allocated, device memory bounded to a few layers while streaming, and clean failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from memory_caps import caps

import jaxmap
from jaxmap.errors import UserError
from jaxmap.families import preset_config, read_config_json
from jaxmap.planning.fit import layer_weight_bytes

DATA = Path(__file__).parent / "data"
PROMPT = [[1, 5, 9, 2, 7, 3, 11]]


@pytest.fixture(scope="module")
def reference():
    return jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0")


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False,
                        max_memory=caps(preset_config("tiny"), 1, 1), offload_folder=folder)
    return model, folder


def test_host_and_disk_layers_give_the_same_tokens_and_logits(reference, offloaded):
    model, folder = offloaded
    assert [(s.start, s.end, s.memory_kind) for s in model.device_map.stages] == [
        (0, 1, "device"), (1, 2, "host"), (2, 4, "disk")]
    assert sorted(p.name for p in next(folder.iterdir()).iterdir()) == ["layer-0002.safetensors",
                                                                        "layer-0003.safetensors"]
    want = reference.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)[0].token_ids
    assert model.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)[0].token_ids == want
    np.testing.assert_allclose(model.forward_logits(PROMPT)[0], reference.forward_logits(PROMPT)[0], atol=1e-5)


def allocated(model) -> dict[tuple[str, str], int]:
    """Bytes of the model's parameter arrays per (device, memory kind), as jax holds them."""
    out: dict[tuple[str, str], int] = {}
    for stage in model.engine.stages:
        for leaf in jax.tree.leaves(stage.params):
            for shard in leaf.addressable_shards:
                key = (f"cpu[{shard.device.id}]", leaf.sharding.memory_kind or "device")
                out[key] = out.get(key, 0) + shard.data.nbytes
    return out


def test_planned_bytes_match_what_is_allocated(offloaded):
    model, _ = offloaded
    got = allocated(model)
    plan = {r.device: r for r in model.device_map.memory}
    assert got[("cpu[0]", "device")] == pytest.approx(plan["cpu[0]"].weights_bytes, rel=0.10)
    assert got[("cpu[0]", "pinned_host")] == pytest.approx(plan["pinned_host"].weights_bytes, rel=0.10)
    assert plan["offload"].weights_bytes == model.engine.stages[-1].disk.stored_bytes()
    caches = model.engine.new_cache(1)
    kv = sum(b.nbytes for stage in caches for pair in stage for b in pair)
    assert kv == pytest.approx(plan["cpu[0]"].kv_cache_bytes, rel=0.10)
    model.engine.release_cache(caches)


def test_tensor_parallel_plan_matches_allocation():
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, tp=4, pp=2)
    got = allocated(model)
    for r in model.device_map.memory:
        assert got[(r.device, "device")] == pytest.approx(r.weights_bytes, rel=0.10), r.device


def test_streaming_keeps_device_memory_to_a_few_layers(monkeypatch):
    config = preset_config("tiny-deep")
    model = jaxmap.load("preset:tiny-deep", max_seq_len=64, progress=False, max_memory=caps(config, 0, 80))
    assert [(s.memory_kind, s.end - s.start) for s in model.device_map.stages] == [("host", 80)]
    gate = (config.hidden_size, config.intermediate_size)  # w_gate and w_up: two arrays per layer

    def on_device() -> int:
        return sum(1 for a in jax.live_arrays()
                   if a.shape == gate and (a.sharding.memory_kind or "device") == "device")

    baseline, peak = on_device(), 0  # other tests' models may hold arrays of this shape
    original = model.engine._call

    def counting(*args, **kwargs):
        nonlocal peak
        out = original(*args, **kwargs)
        peak = max(peak, on_device() - baseline)
        return out

    monkeypatch.setattr(model.engine, "_call", counting)
    model.generate(PROMPT, max_new_tokens=3, stop_at_eos=False)
    layers = peak / 2
    assert 1 <= layers <= 3, f"{layers} layers' weights were in device memory at once (80 streamed)"


def test_disk_tier_reads_safetensors_in_place(tmp_path):
    folder = DATA / "tiny-llama"
    config = read_config_json(folder / "config.json")
    ref = jaxmap.load(folder, max_seq_len=64, progress=False, devices="0")
    model = jaxmap.load(folder, max_seq_len=64, progress=False, max_memory=caps(config, 0, 0),
                        offload_folder=tmp_path / "unused")
    assert {s.memory_kind for s in model.device_map.stages} == {"disk"}
    assert not (tmp_path / "unused").exists()  # safetensors are read where they are: nothing written
    ids = [[3, 17, 42, 8, 99]]
    np.testing.assert_allclose(model.forward_logits(ids)[0], ref.forward_logits(ids)[0], atol=1e-5)


def test_unwritable_offload_folder_fails_before_loading(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="is not writable"):
        jaxmap.load("preset:tiny", max_seq_len=64, progress=False,
                    max_memory=caps(preset_config("tiny"), 0, 0), offload_folder=blocker / "sub")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxmap.generate", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--max-memory", "0:12QB"], "is not a size"),
    (["--max-memory", "9:1GiB"], "names cpu[9]"),
    (["--max-memory", "0:0"], "must be a positive size"),
    (["--max-seq-len", "0"], "--max-seq-len"),
    (["--max-memory", "0:64KiB,host:1KiB", "--no-disk"], "does not fit"),
])
def test_cli_memory_errors_are_one_line(flags, message, tmp_path):
    out = run_cli("-m", str(DATA / "tiny-llama"), "--prompt", "hi", "--offload-folder", str(tmp_path / "off"), *flags)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "off").exists()


def test_chunked_prefill_attention_matches_one_block(monkeypatch):
    from jaxmap.planning import memory

    ids = [list(np.random.default_rng(0).integers(0, 512, 1100))]
    model = jaxmap.load("preset:tiny", max_seq_len=1280, progress=False, devices="0")
    chunked = model.forward_logits(ids)[0]
    monkeypatch.setattr(memory, "PREFILL_QUERY_CHUNK", 4096)
    whole = jaxmap.load("preset:tiny", max_seq_len=1280, progress=False, devices="0").forward_logits(ids)[0]
    np.testing.assert_allclose(chunked, whole, atol=2e-5)


def test_native_gguf_plan_counts_the_files_own_bytes(smollm2_native):
    model = smollm2_native  # the GGUF in its own types on cpu[0], max_seq_len 64
    (row,) = [r for r in model.device_map.memory if r.device == "cpu[0]"]
    assert allocated(model)[("cpu[0]", "device")] == pytest.approx(row.weights_bytes, rel=0.10)
    assert row.weights_bytes < 120 << 20  # Q4_1 layers + Q8_0 embeddings, not the 513 MiB float32 model


def test_quantized_layers_stream_from_host_memory_too():
    config = preset_config("tiny")
    ref = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq="Q8_0")
    w, w8 = (layer_weight_bytes(config, 0, 1, "float32", t) for t in (None, "Q8_0"))
    device = caps(config, 0, 0)["0"] - 2 * w + 2 * w8 + w8 // 2  # two Q8_0 streaming buffers, no resident layer
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, isq="Q8_0",
                        max_memory={"0": device, "host": 1 << 30})
    host = [s for s in model.engine.stages if s.memory_kind == "host"]
    assert host and {leaf.sharding.memory_kind for s in host for leaf in jax.tree.leaves(s.params["layers"])} == {
        "pinned_host"}
    assert host[0].params["layers"][0]["wq"].qtype == "Q8_0"
    want = ref.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)[0].token_ids
    assert model.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)[0].token_ids == want


@pytest.mark.parametrize("isq", ["Q8_0", "Q4K"])
def test_quantized_layers_are_stored_quantized_on_the_disk_tier(isq, tmp_path):
    """ISQ on disk-tier layers: the offload folder holds each weight's QTensor leaves (the quantized bytes the
    planner counted, not float), a step streams them, and the logits equal the all-resident quantized model's."""
    config = preset_config("tiny")
    ref = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq=isq)
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, isq=isq, offload_folder=tmp_path,
                        max_memory=caps(config, 1, 1, isq=isq))
    assert [(s.start, s.end, s.memory_kind) for s in model.device_map.stages] == [
        (0, 1, "device"), (1, 2, "host"), (2, 4, "disk")]
    disk = model.engine.stages[-1].disk
    layer = disk.read(2)
    assert layer["wq"].qtype == isq and layer["attn_norm"].dtype == np.float32
    plan = {r.device: r for r in model.device_map.memory}
    assert plan["offload"].weights_bytes == disk.stored_bytes()
    assert disk.stored_bytes() < 0.4 * 2 * layer_weight_bytes(config, 2, 1, "float32", None)
    np.testing.assert_allclose(model.forward_logits(PROMPT)[0], ref.forward_logits(PROMPT)[0], atol=1e-5)
    want = ref.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)[0].token_ids
    assert model.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)[0].token_ids == want
    again = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, isq=isq, offload_folder=tmp_path,
                        max_memory=caps(config, 1, 1, isq=isq))  # the complete folder is reused, not rewritten
    assert again.engine.stages[-1].disk.read(2)["wq"].qtype == isq
    assert len(list(tmp_path.iterdir())) == 1


def test_native_gguf_layers_on_disk_keep_their_types(default_gguf, smollm2_native, tmp_path):
    """A GGUF kept in its quantized types streams its disk-tier layers in those types (repacked once into the
    offload folder), with the logits of the all-resident native load."""
    ref = smollm2_native  # all resident on cpu[0], max_seq_len 64
    model = jaxmap.load(default_gguf, max_seq_len=64, progress=False, offload_folder=tmp_path,
                        max_memory={"0": "45MiB", "host": 1})
    assert [s.memory_kind for s in model.device_map.stages] == ["device", "disk"], model.device_map.render_table()
    disk = model.engine.stages[-1].disk
    assert disk.read(min(disk.specs))["w_up"].qtype == "Q4_1"
    assert {r.device: r for r in model.device_map.memory}["offload"].weights_bytes == disk.stored_bytes()
    ids = [[1, 2, 3, 4, 5, 6, 7, 8]]
    # the resident layers' products run in the native CPU kernel, the streamed ones in XLA: the same float32 sums in
    # another order, 30 layers deep (measured 1.7e-5 of the largest logit)
    want = ref.forward_logits(ids)[0]
    np.testing.assert_allclose(model.forward_logits(ids)[0], want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_disk_layers_of_different_types_in_one_stage(tmp_path):
    """A topology gives the disk-tier layers different types: each streamed layer is placed as its own type needs
    (one program per stage, retraced per type), and the logits equal the all-resident model's with the same types."""
    config = preset_config("tiny")
    topology = {"2-3": {"isq": "Q4K"}, "3-4": {"isq": "Q6K"}}
    ref = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq="Q8_0", topology=topology)
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, isq="Q8_0", topology=topology,
                        offload_folder=tmp_path, max_memory=caps(config, 0, 0, isq="Q8_0"))
    disk = [s for s in model.engine.stages if s.memory_kind == "disk"][0].disk
    types = {i: getattr(disk.read(i)["wq"], "qtype", None) for i in disk.specs}
    assert types == {0: "Q8_0", 1: "Q8_0", 2: "Q4K", 3: "Q6K"}, types
    np.testing.assert_allclose(model.forward_logits(PROMPT)[0], ref.forward_logits(PROMPT)[0], atol=1e-5)


def test_rewritten_safetensors_get_a_new_offload_folder(tmp_path):
    """Quantized layers of a Hugging Face folder go through the offload folder, whose name follows the weight
    files: rewriting model weights in place (as save_pretrained does) does not reuse the old quantized copy."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(DATA / "tiny-llama", folder)
    config = read_config_json(folder / "config.json")
    offload = tmp_path / "offload"

    def load():
        return jaxmap.load(folder, max_seq_len=64, progress=False, isq="Q8_0", offload_folder=offload,
                           max_memory=caps(config, 0, 0, isq="Q8_0"))

    load()
    assert len(list(offload.iterdir())) == 1
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data)  # same bytes, new modification time: a rewrite
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    load()
    assert len(list(offload.iterdir())) == 2
