"""``doctor --model``: will this model run on this machine, and how?

The verdict comes from the same planner as ``generate`` (so it cannot disagree with what loading would do), plus
XLA's own figure for the biggest temporary: one decoder layer's last prefill step (a chunk of ``--prefill-chunk``
tokens x ``--max-batch-size`` reading the cache before it, or the whole ``--max-seq-len`` when that is shorter) is
lowered and compiled from shapes alone (nothing is allocated, no weight is read) and its
``memory_analysis().temp_size_in_bytes`` is set beside the planner's activation estimate.
"""

from __future__ import annotations

import dataclasses

from jaxmap.config import ModelConfig
from jaxmap.config.dtypes import parse_dtype
from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.planning.device_map import DeviceMap, format_bytes
from jaxmap.planning.fit import layer_weight_bytes
from jaxmap.planning.memory import activation_bytes, prefill_chunk
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import Wish

# Rough transfer rates for the expected cost of offload (bytes/s): PCIe 4.0 x16 for pinned host -> GPU, a fast NVMe
# for disk, and host memory bandwidth where the "device" is the CPU itself.
HOST_TO_DEVICE = {"cuda": 25e9, "rocm": 25e9, "tpu": 25e9, "cpu": 20e9}
DISK_READ = 2e9


@dataclasses.dataclass
class Verdict:
    status: str  # "fits", "fits with offload", "does not fit"
    lines: list[str]
    device_map: DeviceMap | None
    xla_temp_bytes: int | None = None
    planned_activation_bytes: int | None = None

    def render(self) -> str:
        return "\n".join([f"verdict: {self.status}", *("  " + line for line in self.lines)])


def judge(config: ModelConfig, hardware: Hardware, wish: Wish, dtype: str, max_seq_len: int,
          max_batch_size: int, check_xla: bool = True, stored: dict[str, int] | None = None,
          prefill_chunk: int | None = None) -> Verdict:
    try:
        device_map = plan(config, hardware, wish, dtype, max_seq_len, max_batch_size, stored,
                          prefill_chunk=prefill_chunk)
    except UserError as exc:
        if "does not fit" not in str(exc):
            raise
        return Verdict("does not fit", [str(exc)], None)
    counts: dict[str, int] = {}
    for s in device_map.stages:
        counts[s.memory_kind] = counts.get(s.memory_kind, 0) + s.end - s.start
    lines = [device_map.reason]
    for m in device_map.memory:
        cap = f" of {format_bytes(m.capacity_bytes)}" if m.capacity_bytes else ""
        lines.append(f"{m.device}: {format_bytes(m.total_bytes)}{cap}{'' if m.fits else ' (DOES NOT FIT)'}")
    streamed = {k: v for k, v in counts.items() if k != "device"}
    if not all(m.fits for m in device_map.memory):
        status = "does not fit"
        lines.append("the layout was asked for by hand; let automatic mapping offload, or use fewer layers per device")
    elif streamed:
        status = "fits with offload"
        w = layer_weight_bytes(config, 0, 1, device_map.dtype, device_map.stages[-1].isq[-1], stored)
        rate = HOST_TO_DEVICE.get(hardware.default_platform, 20e9)
        host_s = counts.get("host", 0) * w / rate
        disk_s = counts.get("disk", 0) * w / DISK_READ
        where = ", ".join(f"{n} layers on {k}" for k, n in streamed.items())
        lines.append(f"{where}: every token moves {format_bytes(sum(streamed.values()) * w)} of weights, about "
                     f"{(host_s + disk_s) * 1000:.0f} ms per forward pass at ~{rate / 1e9:.0f} GB/s host->device"
                     f"{f' and ~{DISK_READ / 1e9:.0f} GB/s from disk' if counts.get('disk') else ''} (an estimate); "
                     "quantizing (--isq) or more accelerator memory keeps more layers resident")
    else:
        status = "fits"
    verdict = Verdict(status, lines, device_map)
    if check_xla:
        itemsize = parse_dtype(device_map.dtype).itemsize
        tp = device_map.stages[0].tp
        chunk = device_map.chunk
        verdict.planned_activation_bytes = activation_bytes(config, tp, itemsize, max_seq_len, max_batch_size, chunk)
        verdict.xla_temp_bytes = xla_layer_temp_bytes(config, device_map.dtype, max_seq_len, max_batch_size, tp, chunk)
        verdict.lines.append(
            f"prefill activations at {max_batch_size} x {chunk} tokens per step (--max-seq-len {max_seq_len}): planned "
            f"{format_bytes(verdict.planned_activation_bytes)}, XLA's memory_analysis of one layer: "
            f"{format_bytes(verdict.xla_temp_bytes)} temporaries (tp={tp}, per device)")
    return verdict


def xla_layer_temp_bytes(config: ModelConfig, dtype: str, seq: int, batch: int, tp: int = 1,
                         chunk: int | None = None) -> int:
    """Temporary bytes XLA plans for one decoder layer's last prefill step of a ``batch x seq`` prompt, prefilled
    ``chunk`` tokens at a time (shapes only); the layer with the largest cache (a full-attention one) is lowered."""
    import jax
    import jax.numpy as jnp

    from jaxmap.engine import layers
    from jaxmap.engine.engine import attend_bucket
    from jaxmap.families import family_of, layer_param_specs
    from jaxmap.families.rope import inverse_frequencies

    jdtype = jnp.dtype(parse_dtype(dtype))
    heads_local = config.num_attention_heads // tp
    kv_local = max(1, config.num_key_value_heads // tp)
    cfg = dataclasses.replace(config, num_attention_heads=heads_local, num_key_value_heads=kv_local,
                              intermediate_size=config.intermediate_size // tp)
    family = family_of(config)
    layer = max(range(config.num_hidden_layers), key=lambda i: family.kv_slots(config, i, seq))
    c = prefill_chunk(seq, chunk)
    start = (seq - 1) // c * c  # the last chunk's first slot
    history = attend_bucket(start, seq) if start else 0
    specs = layer_param_specs(cfg, layer)
    params = {k: jax.ShapeDtypeStruct(s.shape, jdtype) for k, s in specs.items()}
    cache = jax.ShapeDtypeStruct((batch, kv_local, family.kv_slots(config, layer, seq), config.head_dim), jdtype)
    x = jax.ShapeDtypeStruct((batch, c, config.hidden_size), jdtype)
    inv_freq = inverse_frequencies(config)

    def step(p, x, kc, vc):
        ctx = layers.attention_context(jnp.int32(start), jnp.zeros(batch, jnp.int32), c, c, inv_freq, inv_freq)
        return layers.decoder_layer(p, x, kc, vc, jnp.int32(start), ctx, c, cfg, family.layer_design(config, layer),
                                    history=history)

    compiled = jax.jit(step, donate_argnums=(2, 3)).lower(params, x, cache, cache).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)
