"""The memory model behind automatic mapping: bytes per layer, KV cache, activations, headroom, and ``--max-memory``.

Pure data, no jax: the planner uses it for hardware you may not have. Every figure is per device *after sharding*
(a tp=4 stage holds a quarter of each split weight and of its kv heads, or a full replica where kv heads are fewer
than the devices).

Headroom (what the plan keeps free on each memory): max(2% of the capacity, 512 MiB) on an accelerator (mistral.rs's
rule: allocator fragmentation, cuBLAS/XLA workspaces, compiled programs), max(5% of the capacity, 1 GiB) for host
memory (the Python process, the tokenizer, the loader's one-tensor buffer and the offload reader live there too).
"""

from __future__ import annotations

import re

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import family_of

MIB = 1 << 20
GIB = 1 << 30
ACCELERATOR_HEADROOM = (0.02, 512 * MIB)
HOST_HEADROOM = (0.05, 1 * GIB)
# CUDA's pinned host memory is a pool capped at 64 GB unless XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says otherwise.
CUDA_PINNED_POOL_DEFAULT_GB = 64

_DEVICE_NAME = re.compile(r"(cpu|cuda|rocm|metal|tpu)\[\d+\]")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": MIB, "mi": MIB, "g": 1000**3, "gb": 1000**3, "gib": GIB, "gi": GIB, "t": 1000**4, "tb": 1000**4,
          "tib": 1 << 40, "ti": 1 << 40}


PREFILL_QUERY_CHUNK = 512
# Prompt tokens per prefill step: longer prompts are prefilled in chunks of this many, each attending to the cache
# the chunks before it wrote, so prefill temporaries grow with the chunk, not with --max-seq-len (llama.cpp's
# n_batch and vLLM's max_num_batched_tokens are 2048 by default too).
DEFAULT_PREFILL_CHUNK = 2048
# The float32 scores and probabilities of one block of queries against its keys, per device, at most this much.
SCORES_BUDGET = 512 * MIB


def prefill_chunk(max_seq_len: int, requested: int | None = None) -> int:
    """Tokens per prefill step: ``requested`` (``--prefill-chunk``) or the default, never more than the context."""
    chunk = DEFAULT_PREFILL_CHUNK if requested is None else requested
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"--prefill-chunk must be a whole number >= 1, got {chunk!r}")
    return min(chunk, max_seq_len)


def prefill_query_block(queries: int, keys: int, rows: int) -> int:
    """Queries per attention block in a prefill step of ``queries`` tokens against ``keys`` keys, ``rows`` being
    batch x heads: all of them up to 1024, else 512 at a time, halved (down to 16) while the block's float32 scores
    and probabilities would pass :data:`SCORES_BUDGET` (a 128k-token context's keys)."""
    block = queries if queries <= 2 * PREFILL_QUERY_CHUNK else PREFILL_QUERY_CHUNK
    if rows * block * keys * 8 <= SCORES_BUDGET:
        return block
    block = min(PREFILL_QUERY_CHUNK, 1 << (queries.bit_length() - 1))
    while block > 16 and rows * block * keys * 8 > SCORES_BUDGET:
        block //= 2
    return block


def prefill_keys(config: ModelConfig, max_seq_len: int, chunk: int) -> int:
    """Keys one prefill step attends to at most: the prompt itself when it is one chunk, else the largest cache a
    layer reads (the whole context, or a sliding layer's ring of its window) plus the chunk's own keys."""
    if chunk >= max_seq_len:
        return max_seq_len
    family = family_of(config)
    slots = max(family.kv_slots(config, i, max_seq_len) for i in range(config.num_hidden_layers))
    return slots + chunk


def headroom(capacity: int, host: bool = False) -> int:
    frac, floor = HOST_HEADROOM if host else ACCELERATOR_HEADROOM
    return min(capacity, max(int(capacity * frac), floor))


def parse_size(text: str, what: str = "--max-memory") -> int:
    """``"20GiB"`` -> bytes. Units as accelerate writes them: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB of 1024."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"{what}: {text!r} is not a size; write e.g. 20GiB, 512MiB or 16GB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value <= 0:
        raise UserError(f"{what}: {text!r} must be a positive size")
    return int(value)


def parse_max_memory(spec: str | dict | None) -> dict[str, int] | None:
    """``"0:20GiB,1:14GiB,host:64GiB"`` -> ``{"0": ..., "1": ..., "host": ...}`` (keys: ordinals, device names such
    as ``cuda[1]``, or ``host``/``cpu`` for host memory). A dict (the Python API) may hold ints of bytes."""
    if spec is None:
        return None
    items = list(spec.items()) if isinstance(spec, dict) else None
    if items is None:
        text = str(spec).strip()
        if not text:
            raise UserError("--max-memory is empty; write e.g. 0:20GiB,1:14GiB,host:64GiB")
        items = []
        for part in text.split(","):
            key, sep, size = part.partition(":")
            if not sep or not key.strip() or not size.strip():
                raise UserError(f"--max-memory {text!r}: {part.strip()!r} is not DEVICE:SIZE "
                                "(e.g. 0:20GiB, host:64GiB)")
            items.append((key, size))
    out: dict[str, int] = {}
    for key, size in items:
        name = str(key).strip().lower()
        if name == "cpu":
            name = "host"
        if not (name == "host" or re.fullmatch(r"\d+", name) or _DEVICE_NAME.fullmatch(name)):
            raise UserError(f"--max-memory: {key!r} is not a device; use an ordinal (0), a name (cuda[1]) or host")
        if name in out:
            raise UserError(f"--max-memory names {name} twice")
        if isinstance(size, bool):
            raise UserError(f"--max-memory: size for {name} must be a number of bytes or a string like 20GiB")
        if isinstance(size, (int, float)):
            if size <= 0:
                raise UserError(f"--max-memory: size for {name} must be positive, got {size}")
            out[name] = int(size)
        else:
            out[name] = parse_size(size, f"--max-memory {name}")
    return out


def kv_cache_bytes(config: ModelConfig, tp: int, itemsize: int, max_seq_len: int, max_batch_size: int,
                   layer: int | None = None) -> int:
    """One layer's K and V buffers on one device: split on kv heads when they divide over tp, else replicated.
    ``layer`` lets the family say how many slots that layer holds (a sliding-window layer fewer than
    ``max_seq_len``); None counts a full-context layer."""
    kv_heads = config.num_key_value_heads
    per_device = kv_heads // tp if kv_heads % tp == 0 else kv_heads
    slots = max_seq_len if layer is None else family_of(config).kv_slots(config, layer, max_seq_len)
    return 2 * max_batch_size * slots * per_device * config.head_dim * itemsize


def activation_bytes(config: ModelConfig, tp: int, itemsize: int, max_seq_len: int, max_batch_size: int,
                     chunk: int | None = None) -> int:
    """Peak temporaries of one prefill step of ``max_batch_size`` rows of ``chunk`` tokens (the prefill chunk,
    :func:`prefill_chunk`) on one device.

    A step materialises its queries/keys/values, the attention scores and probabilities of one query block against
    every key it sees ([batch, heads/tp, block, keys] in float32, :func:`prefill_query_block`), the cache slots
    earlier chunks wrote (read beside the new keys) and the MLP's gate/up/product ([batch, chunk,
    intermediate/tp]); a few copies of the hidden state live throughout. The larger of the attention and MLP peaks
    counts (XLA frees one before the other), plus the logits of the last position. ``doctor --model`` compares this
    with XLA's own ``memory_analysis`` of the compiled layer.
    """
    c = prefill_chunk(max_seq_len, chunk)
    b, d = max_batch_size, config.hidden_size
    heads = config.num_attention_heads // tp if config.num_attention_heads % tp == 0 else config.num_attention_heads
    kv_heads = config.num_key_value_heads
    kv_local = kv_heads // tp if kv_heads % tp == 0 else kv_heads
    keys = prefill_keys(config, max_seq_len, c)
    block = prefill_query_block(c, keys, b * config.num_attention_heads)
    hidden = 3 * b * c * d * itemsize
    history = 2 * b * keys * kv_local * config.head_dim * itemsize if keys > c else 0
    attention = (b * c * (heads + 2 * kv_local) * config.head_dim * itemsize + history
                 + 2 * b * heads * block * keys * 4)
    mlp = 3 * b * c * (config.intermediate_size // tp if config.intermediate_size % tp == 0
                       else config.intermediate_size) * itemsize
    logits = 2 * b * config.vocab_size * 4
    return hidden + max(attention, mlp) + logits
