"""jaxmap's GGUF reader against gguf's own reader and writer: every value type, tensors, and damaged files."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf_files import write_gguf

from jaxmap.errors import UserError
from jaxmap.loading import gguf_reader
from jaxmap.loading.gguf_reader import GGUFFormatError, open_gguf

STRINGS = ["hello", "", "héllo wörld", "日本語", "🙂👍🏽", "", "tab\tand\nnewline", "▁the", "x" * 300]
SCALARS = {  # key: (writer method, value, GGUF value type)
    "t.u8": ("add_uint8", 200, V.UINT8), "t.i8": ("add_int8", -100, V.INT8),
    "t.u16": ("add_uint16", 60000, V.UINT16), "t.i16": ("add_int16", -30000, V.INT16),
    "t.u32": ("add_uint32", 4_000_000_000, V.UINT32), "t.i32": ("add_int32", -2_000_000_000, V.INT32),
    "t.f32": ("add_float32", 0.1, V.FLOAT32), "t.bool": ("add_bool", True, V.BOOL),
    "t.false": ("add_bool", False, V.BOOL), "t.str": ("add_string", "naïve café ☕", V.STRING),
    "t.empty": ("add_key_value", "", V.STRING), "t.u64": ("add_uint64", 2**63 + 5, V.UINT64),
    "t.i64": ("add_int64", -(2**62), V.INT64), "t.f64": ("add_float64", 1 / 3, V.FLOAT64),
}
ARRAYS = {  # key: (values, element type)
    "a.u8": ([1, 2, 255], V.UINT8), "a.i8": ([-1, 0, 127], V.INT8), "a.u16": ([0, 65535], V.UINT16),
    "a.i16": ([-5, 5], V.INT16), "a.u32": ([7, 2**32 - 1], V.UINT32), "a.i32": ([-1, 2, -3], V.INT32),
    "a.f32": ([0.5, -1.25, 3.0], V.FLOAT32), "a.bool": ([True, False, True], V.BOOL),
    "a.u64": ([2**64 - 1, 0], V.UINT64), "a.i64": ([-(2**63), 1], V.INT64), "a.f64": ([1e-300, 2.5], V.FLOAT64),
    "a.str": (STRINGS, V.STRING), "a.one": (["only"], V.STRING),
}
NESTED = [[1, 2, 3], [4], [5, 6]]
NESTED_STR = [["a", "", "é"], ["b"]]
TENSORS = {
    "f32.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "f16.weight": np.linspace(-1, 1, 40, dtype=np.float32).astype(np.float16).reshape(5, 8),
    "f64.weight": np.arange(3, dtype=np.float64),
    "i8.weight": np.arange(-4, 4, dtype=np.int8),
    "i16.weight": np.arange(6, dtype=np.int16).reshape(2, 3),
    "i32.weight": np.arange(5, dtype=np.int32),
    "i64.weight": np.arange(4, dtype=np.int64),
}


def everything(w: gguf.GGUFWriter) -> None:
    for key, (method, value, kind) in SCALARS.items():
        if method == "add_key_value":  # add_string skips an empty string
            w.add_key_value(key, value, kind)
        else:
            getattr(w, method)(key, value)
    for key, (values, kind) in ARRAYS.items():
        w.add_key_value(key, values, V.ARRAY, sub_type=kind)
    w.add_array("n.ints", NESTED)
    w.add_array("n.strs", NESTED_STR)


def quantized(rows: int = 4, cols: int = 256) -> dict[str, tuple[np.ndarray, Q]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    out = {f"{q.name.lower()}.weight": (gguf.quants.quantize(x, q), q) for q in (Q.Q8_0, Q.Q4_1, Q.BF16)}
    out["q4_k.weight"] = (rng.integers(0, 256, (rows, cols // 256 * 144), dtype=np.uint8), Q.Q4_K)  # any bytes
    return out


def write_all(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    everything(w)
    for name, array in TENSORS.items():
        w.add_tensor(name, array)
    for name, (raw, qtype) in quantized().items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def same_as_gguf(path: Path, nested: tuple[str, ...] = ()) -> gguf_reader.GGUFFile:
    """Every metadata value and tensor as gguf's reader sees them (nested arrays, which it flattens, excepted)."""
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert ours.value_types[key][0] == field.types[0], key
        if key not in nested:
            assert plain(ours.metadata[key]) == field.contents(), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.dims, info.shape) == (tuple(t.shape.tolist()), tuple(reversed(t.shape.tolist())))
        assert (info.ggml_type, info.type_name) == (int(t.tensor_type), t.tensor_type.name)
        assert (info.offset, info.nbytes, info.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
        data = ours.tensor_data(t.name)
        assert data.dtype == t.data.dtype and data.shape == t.data.shape and np.array_equal(data, t.data), t.name
        assert ours.tensor_bytes(t.name).tobytes() == np.asarray(t.data).tobytes()
    return ours


def test_every_value_type_and_tensor_type_reads_as_gguf_does(tmp_path):
    path = write_all(tmp_path / "all.gguf")
    f = same_as_gguf(path, nested=("n.ints", "n.strs"))
    md = f.metadata
    for key, (_, value, kind) in SCALARS.items():
        assert f.value_types[key] == (kind,)
        got = md[key]
        assert type(got) is type(value), key
        assert got == (pytest.approx(value, rel=1e-7) if kind == V.FLOAT32 else value), key
    for key, (values, kind) in ARRAYS.items():
        assert f.value_types[key] == (V.ARRAY, kind)
        if kind == V.STRING:
            assert md[key] == values and all(type(s) is str for s in md[key])
        else:
            assert isinstance(md[key], np.ndarray) and md[key].tolist() == pytest.approx(values, rel=1e-7)
    assert [a.tolist() for a in md["n.ints"]] == NESTED and f.value_types["n.ints"] == (V.ARRAY, V.ARRAY, V.INT32)
    assert md["n.strs"] == NESTED_STR and f.value_types["n.strs"] == (V.ARRAY, V.ARRAY, V.STRING)
    assert f.version == 3 and f.alignment == 32 and f.data_start % 32 == 0
    np.testing.assert_array_equal(f.tensor_data("f32.weight"), TENSORS["f32.weight"])
    assert f.tensor_data("f16.weight").dtype == np.float16
    q8 = quantized()["q8_0.weight"][0]
    np.testing.assert_array_equal(f.tensor_data("q8_0.weight"), q8)  # byte rows, as gguf.quants reads them
    assert f.tensor_data("bf16.weight").dtype == np.uint8 and f.tensors["bf16.weight"].shape == (4, 256)
    f.close()


def test_version_2_reads_like_version_3(tmp_path):
    path = write_all(tmp_path / "v2.gguf")
    raw = bytearray(path.read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the layout (v3 only allowed big-endian files)
    path.write_bytes(bytes(raw))
    assert same_as_gguf(path, nested=("n.ints", "n.strs")).version == 2


@pytest.mark.parametrize("alignment", [1, 8, 64, 256])
def test_alignment(tmp_path, alignment):
    path = write_all(tmp_path / f"a{alignment}.gguf", alignment=alignment)
    f = same_as_gguf(path, nested=("n.ints", "n.strs"))
    assert f.alignment == alignment and f.data_start % alignment == 0
    assert all((t.offset - f.data_start) % alignment == 0 for t in f.tensors.values())


@pytest.mark.parametrize("strings", [
    [chr(c) for c in range(128)] + ["é", ""],  # every ASCII byte: decoded one by one
    ["a\x00b", "\x00", "", "c", "日\x00本"],  # NUL inside strings: another separator byte
    [""] * 50,
    ["🙂" * 1000, "", "a"],
])
def test_string_arrays_in_bulk(tmp_path, strings):
    path = write_gguf(tmp_path / "s.gguf", {"t.weight": np.ones(4, np.float32)},
                      metadata=lambda w: w.add_key_value("s", strings, V.ARRAY, sub_type=V.STRING))
    assert open_gguf(path).metadata["s"] == strings == gguf.GGUFReader(path).fields["s"].contents()


def test_the_default_model_reads_as_gguf_does(default_gguf):
    f = same_as_gguf(default_gguf)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152 and len(f.tensors) == 272
    assert f.metadata["general.architecture"] == "llama"


def test_a_file_is_parsed_once_and_again_when_it_changes(tmp_path, monkeypatch, default_gguf):
    from jaxmap.loading import open_source

    calls = []
    parse = gguf_reader._parse
    monkeypatch.setattr(gguf_reader, "_parse", lambda *a: calls.append(a[0]) or parse(*a))
    monkeypatch.setattr(gguf_reader, "_cache", {})
    for _ in range(2):  # the tokenizer check, then the load
        source = open_source(default_gguf)
        assert source.tokenizer() is not None
        source.close()
    assert len(calls) == 1
    path = write_gguf(tmp_path / "m.gguf", {"t.weight": np.ones(4, np.float32)},
                      metadata=lambda w: w.add_string("k", "before"))
    assert open_gguf(path).metadata["k"] == "before"
    path.write_bytes(path.read_bytes().replace(b"before", b"after!"))  # same size, maybe the same mtime
    assert open_gguf(path).metadata["k"] == "after!"
    path.write_bytes(path.read_bytes()[:-24])  # into the tensor, past the padding after it
    with pytest.raises(UserError, match="tensor t.weight"):
        open_gguf(path)


# ---- damaged files ---------------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path) -> Path:
    def metadata(w):
        w.add_array("tokenizer.ggml.tokens", ["a", "bé", "", "c"])
        w.add_array("scores", [0.5, 1.5])
        w.add_string("dup.a", "x")
        w.add_string("dup.b", "y")

    return write_gguf(tmp_path / "small.gguf", {"tok.weight": np.ones((4, 8), np.float32),
                                                "norm.weight": np.ones(8, np.float32)}, metadata=metadata)


def damaged(path: Path, change) -> Path:
    raw = bytearray(path.read_bytes())
    change(raw)
    out = path.with_name("damaged.gguf")
    out.write_bytes(bytes(raw))
    return out


def after(raw: bytearray, text: bytes) -> int:
    """The offset just past the first occurrence of ``text``."""
    return raw.index(text) + len(text)


def put(raw: bytearray, at: int, fmt: str, value: int) -> None:
    raw[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__(slice(0, 4), b"GGUX"), r"is not a GGUF file \(it does not start with 'GGUF'\)"),
    (lambda r: put(r, 4, "<I", 1), "is GGUF version 1, which jaxmap does not read"),
    (lambda r: put(r, 4, "<I", 4), "is GGUF version 4, which jaxmap does not read"),
    (lambda r: put(r, 4, ">I", 3), "is a big-endian GGUF file"),
    (lambda r: r.__delitem__(slice(20, None)), r"truncated or corrupt: it ends inside its header \(the file has 20"),
    (lambda r: put(r, 8, "<Q", 2**62), r"ends inside its tensor index, at tensor \d+ of the 4611686018427387904"),
    (lambda r: put(r, 16, "<Q", 2**62), r"ends inside its metadata, at entry \d+ of the 4611686018427387904"),
    (lambda r: put(r, after(r, b"tokenizer.ggml.tokens") + 8, "<Q", 2**60), "ends inside its metadata, at entry"),
    (lambda r: put(r, after(r, b"scores") + 8, "<Q", 2**60), "ends inside its metadata, at entry"),
    (lambda r: put(r, after(r, b"tokenizer.ggml.tokens") + 16, "<Q", 2**63), "ends inside its metadata"),
    (lambda r: put(r, after(r, b"dup.a") + 4, "<Q", 2**40), "ends inside its metadata"),
    (lambda r: put(r, after(r, b"dup.a"), "<I", 13), "metadata entry 'dup.a' has an unknown value type 13"),
    (lambda r: put(r, after(r, b"scores"), "<I", 9) or put(r, after(r, b"scores") + 4, "<I", 99),
     "metadata entry 'scores' has an array of unknown value type 99"),
    (lambda r: r.__setitem__(slice(after(r, b"dup.") , after(r, b"dup.") + 1), b"b"), "key 'dup.b' appears twice"),
    (lambda r: r.__setitem__(slice(after(r, b"b\xc3"), after(r, b"b\xc3") + 1), b"A"),
     r"metadata entry 'tokenizer.ggml.tokens': string 2 of its 4 is not UTF-8 text"),
    (lambda r: r.__setitem__(slice(after(r, b"dup.b") + 12, after(r, b"dup.b") + 13), b"\xff"),
     "metadata entry 'dup.b': its value is not UTF-8 text"),
    (lambda r: put(r, after(r, b"tok.weight") + 4 + 16, "<I", 250), "tensor tok.weight has ggml type 250"),
    (lambda r: put(r, after(r, b"tok.weight") + 4, "<Q", 0), "tensor tok.weight has no elements"),
    (lambda r: put(r, after(r, b"tok.weight") + 4 + 16, "<I", int(Q.Q8_0)),
     "tensor tok.weight has rows of 8 elements, not a whole number of Q8_0 blocks of 32"),
    (lambda r: put(r, after(r, b"norm.weight") + 4 + 8 + 4, "<Q", 2**40),
     r"tensor norm.weight \(F32\) needs 32 bytes from byte \d+ but only 0 are there"),
    (lambda r: r.__delitem__(slice(len(r) - 20, None)),
     r"tensor norm.weight \(F32\) needs 32 bytes from byte \d+ but only 12 are there \(the file has"),
])
def test_damaged_files_are_one_line_errors(small, change, message):
    path = damaged(small, change)
    with pytest.raises(GGUFFormatError, match=message) as info:
        open_gguf(path)
    text = str(info.value)
    assert text.startswith(str(path)) and "\n" not in text and "Traceback" not in text


def test_truncated_anywhere_is_a_clear_line(small):
    raw = small.read_bytes()
    for keep in range(0, len(raw), 7):
        path = small.with_name("cut.gguf")
        path.write_bytes(raw[:keep])
        with pytest.raises(UserError, match="is truncated or corrupt|is not a GGUF file"):
            open_gguf(path)


def test_a_bad_alignment_is_refused(tmp_path):
    path = write_all(tmp_path / "a.gguf", alignment=64)
    raw = bytearray(path.read_bytes())
    put(raw, after(raw, b"general.alignment") + 4, "<I", 48)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="general.alignment is 48, not a power of two"):
        open_gguf(path)


def test_a_closed_file_says_so(small):
    f = open_gguf(small)
    view = f.tensor_data("tok.weight")
    f.close()
    np.testing.assert_array_equal(view, np.ones((4, 8), np.float32))  # views handed out stay valid
    with pytest.raises(UserError, match="was closed"):
        f.tensor_data("tok.weight")
