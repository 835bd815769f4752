"""Write the tiny random Hugging Face model folders under tests/data/ (torch-free, byte-for-byte deterministic).

The folders are committed so every test and the reference script see the same bytes; rerun this script only when
the recipe changes, then rerun make_reference.py:

    python tests/reference/make_tiny_models.py [--out tests/data]

Weights come from numpy's seeded generator and are written by a small safetensors writer of our own, so the output
does not depend on torch or on the safetensors library version. The tokenizer is a 512-token byte-level BPE trained
by the `tokenizers` library on the fixed text below.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Plain English written for this file; enough distinct pairs that BPE reaches 512 tokens well before running dry.
TRAINING_TEXT = """\
The little engine runs on a table of numbers. Each number is a weight, and each weight was drawn at random, so the
model knows nothing at all about the world. Still, it reads the same bytes every time and it answers the same way
every time, which is all a test needs. The capital of France is Paris, the capital of Italy is Rome, and the
capital of Spain is Madrid. One, two, three, four, five, six, seven, eight, nine, ten. 12345 678 3.14159 2+2=4.
In the morning the baker opens the shop and the smell of fresh bread drifts down the street. Children walk to
school, workers ride the train, and the old man on the corner feeds the birds that gather on the stones.
What is the weather like today? It is warm and bright, with a light wind from the west and a few clouds over the
hills. Tomorrow there may be rain, so take a coat if you go out for a long walk by the river.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
A good question deserves a clear answer. When the answer is not known, say so, and then try to find it. Learning
is slow at first and then faster, because every new thing connects to the things you already understand.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft
zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
user: hello there, how are you? assistant: I am fine, thank you for asking. What would you like to talk about?
user: tell me a story about a ship. assistant: Once upon a time a small ship sailed across a wide and quiet sea,
carrying letters, seeds and stories from one island to the next.
"""

# The pre-tokenizer regex of Qwen2's tokenizer (public format knowledge; transformers hard-codes the same pattern).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Plain-data descriptions of the folders; config.json is built from these.
TINY_LLAMA = {
    "name": "tiny-llama",
    "seed": 1234,
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "tie_word_embeddings": False,
    "qkv_bias": False,
    "qk_norm": False,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    "shards": 2,
    "residual_gain": 1.0,
    "qwen2_pretokenizer": False,
}

TINY_QWEN2 = {
    "name": "tiny-qwen2",
    "seed": 4321,
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "tie_word_embeddings": True,
    "qkv_bias": True,
    "qk_norm": False,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "dtype": "float32",
    "shards": 1,
    # Tied embeddings make each token predict itself; larger layer outputs keep greedy text from looping at once.
    "residual_gain": 3.0,
    # transformers' Qwen2Tokenizer ignores tokenizer.json's pre-tokenizer and uses the Qwen2 regex + NFC; ship
    # exactly that so tokenizer.json, AutoTokenizer and jaxmap all agree.
    "qwen2_pretokenizer": True,
}

TINY_QWEN3 = {
    "name": "tiny-qwen3",
    "seed": 5678,
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # Qwen3 decouples head_dim from hidden_size / num_attention_heads (16 here): q/k/v widths are heads * 32.
    "head_dim": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "tie_word_embeddings": True,
    "qkv_bias": False,  # Qwen3 reads attention_bias (false in the released models)
    # Per-head RMSNorm over head_dim on q and k (self_attn.q_norm / k_norm, shape [head_dim]), before RoPE.
    "qk_norm": True,
    # q/k are unit-RMS after that norm, so the 2.0 q/k projection gain no longer sharpens attention; the norm weights
    # set its temperature instead (trained Qwen3 ones are large too). At 1.0 greedy text repeats one token at once.
    "qk_norm_gain": 2.0,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "dtype": "float32",
    "shards": 1,
    "residual_gain": 3.0,  # as tiny-qwen2: tied embeddings otherwise make greedy text loop at once
    "qwen2_pretokenizer": True,  # Qwen3 ships the Qwen2 tokenizer
}

SPECS = (TINY_LLAMA, TINY_QWEN2, TINY_QWEN3)

_NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_ST_CODES = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32"}


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Minimal safetensors writer (sorted names, contiguous data, header padded to 8) so the bytes never drift."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    names = sorted(tensors)
    offset = 0
    for name in names:
        arr = tensors[name]
        span = [offset, offset + arr.nbytes]
        header[name] = {"dtype": _ST_CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": span}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())  # little-endian hosts only, as numpy is there
    return offset


def make_weights(spec: Mapping) -> dict[str, np.ndarray]:
    """Random weights scaled so logits depend on context (not just the last token) and greedy text varies."""
    rng = np.random.default_rng(spec["seed"])
    h, heads, kv, hd = spec["hidden_size"], spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    inter, vocab = spec["intermediate_size"], spec["vocab_size"]

    def mat(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        # ~0.02-0.09 std at these widths: 1/sqrt(fan_in) keeps activations O(1) so attention and MLP both matter.
        return rng.normal(0.0, gain / np.sqrt(in_dim), size=(out_dim, in_dim))

    def norm(dim: int, gain: float = 1.0) -> np.ndarray:
        return gain * (1.0 + rng.normal(0.0, 0.1, size=dim))

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(0.0, 1.0, size=(vocab, h)) * 0.5}
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = mat(heads * hd, h, 2.0)  # sharper attention than uniform averaging
        w[p + "self_attn.k_proj.weight"] = mat(kv * hd, h, 2.0)
        w[p + "self_attn.v_proj.weight"] = mat(kv * hd, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, heads * hd, spec["residual_gain"])
        if spec["qkv_bias"]:
            w[p + "self_attn.q_proj.bias"] = rng.normal(0.0, 0.1, size=heads * hd)
            w[p + "self_attn.k_proj.bias"] = rng.normal(0.0, 0.1, size=kv * hd)
            w[p + "self_attn.v_proj.bias"] = rng.normal(0.0, 0.1, size=kv * hd)
        if spec["qk_norm"]:
            w[p + "self_attn.q_norm.weight"] = norm(hd, spec["qk_norm_gain"])
            w[p + "self_attn.k_norm.weight"] = norm(hd, spec["qk_norm_gain"])
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = mat(inter, h)
        w[p + "mlp.up_proj.weight"] = mat(inter, h)
        w[p + "mlp.down_proj.weight"] = mat(h, inter, spec["residual_gain"])
    w["model.norm.weight"] = norm(h)
    if not spec["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(vocab, h, 4.0)
    dtype = _NP_DTYPES[spec["dtype"]]
    return {k: v.astype(np.float32).astype(dtype) for k, v in w.items()}


def train_tokenizer():
    """Train the shared 512-token byte-level BPE on TRAINING_TEXT (the trainer is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=0,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE or [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise RuntimeError(f"tokenizer came out with {tok.get_vocab_size()} tokens; extend TRAINING_TEXT")
    return tok


def tokenizer_json(tok, qwen2_pretokenizer: bool) -> str:
    """tokenizer.json text; the Qwen2 variant swaps in NFC + the Qwen2 split regex (same vocab and merges)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    tok = Tokenizer.from_str(tok.to_str())
    if qwen2_pretokenizer:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    # Round-trip through json to fix key order and indentation independent of the tokenizers version's pretty-printer.
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"


def config_json(spec: Mapping) -> dict:
    """HF config.json with the legacy rope keys (rope_theta / rope_scaling) that every transformers version reads."""
    cfg = {
        "architectures": spec["architectures"],
        "model_type": spec["model_type"],
        "vocab_size": spec["vocab_size"],
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": spec["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": spec["max_position_embeddings"],
        "rms_norm_eps": spec["rms_norm_eps"],
        "rope_theta": spec["rope_theta"],
        "rope_scaling": spec["rope_scaling"],
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": spec["dtype"],
        "initializer_range": 0.02,
    }
    if spec["model_type"] == "llama":
        cfg.update(attention_bias=spec["qkv_bias"], mlp_bias=False, pretraining_tp=1)
    else:  # qwen2 / qwen3: sliding-window attention off
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec["num_hidden_layers"])
        if spec["model_type"] != "qwen2":  # qwen2 hard-codes q/k/v biases; qwen3 reads the flag
            cfg["attention_bias"] = spec["qkv_bias"]
    return cfg


def tokenizer_config_json() -> dict:
    """No BOS is added (like SmolLM2/Qwen2); the three specials are marked special so decode can skip them."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model(spec: Mapping, out_dir: Path, tok) -> Path:
    """Write one folder: config, tokenizer files and safetensors (sharded with an index when spec asks)."""
    folder = out_dir / spec["name"]
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.safetensors*"):
        stale.unlink()
    weights = make_weights(spec)
    meta = {"format": "pt"}
    if spec["shards"] == 1:
        write_safetensors(folder / "model.safetensors", weights, meta)
    else:
        # Layers split as evenly as possible; embeddings go first, final norm and head last.
        n, layers = spec["shards"], spec["num_hidden_layers"]

        def shard_of(name: str) -> int:
            if name.startswith("model.layers."):
                return int(name.split(".")[2]) * n // layers
            return 0 if name.startswith("model.embed_tokens") else n - 1

        weight_map, total = {}, 0
        for s in range(n):
            fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            part = {k: v for k, v in weights.items() if shard_of(k) == s}
            total += write_safetensors(folder / fname, part, meta)
            weight_map.update(dict.fromkeys(part, fname))
        _dump(folder / "model.safetensors.index.json",
              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _dump(folder / "config.json", config_json(spec))
    _dump(folder / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0, "do_sample": False})
    _dump(folder / "tokenizer_config.json", tokenizer_config_json())
    _dump(folder / "special_tokens_map.json", {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    (folder / "tokenizer.json").write_text(tokenizer_json(tok, spec["qwen2_pretokenizer"]), encoding="utf-8")
    return folder


def write_all(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Write every tiny model folder under out_dir; returns the folders."""
    tok = train_tokenizer()
    return [write_model(spec, Path(out_dir), tok) for spec in SPECS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent folder (default: tests/data)")
    args = parser.parse_args(argv)
    for folder in write_all(args.out):
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {folder} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
