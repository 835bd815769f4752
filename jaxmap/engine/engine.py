"""Jitted prefill and decode over a model's stages, with the KV cache beside its layers.

A *stage* is a contiguous range of layers whose parameters and KV cache live on one group of devices. The engine
runs stages one after another (inference pipelines do not overlap micro-batches), moving the hidden state between
them with ``jax.device_put``. Within a stage the layers run in one of two ways, chosen per stage:

- ``unrolled``: one jit whose body loops over the stage's layers in Python. XLA sees the whole stage, fuses across
  layer boundaries and updates every donated cache buffer in place. Fastest per token (the bench measures it), but
  compile time grows with depth.
- ``per_layer``: one jitted layer function, compiled once and called for every layer. Compile time is independent of
  depth (an 80-layer model compiles as fast as a 2-layer one) for ~10-20% more per-token overhead on XLA:CPU.
- ``scan``: one jit whose body is a ``jax.lax.scan`` over the stage's alike layers, their weights stacked and their
  KV cache carried and written in place (:mod:`jaxmap.engine.scan_stage`): one layer traced, a small executable.

``auto`` unrolls stages of up to :data:`UNROLL_MAX_LAYERS` layers and runs deeper ones per layer, which keeps the
prefill + decode compile of any preset bounded.

Attention reads only a *length bucket* of the cache (128, 256, 512, ... slots, up to ``max_seq_len``): decode at a
short position does not pay for the whole preallocated cache. Each bucket is one more compiled program, so there are
at most log2(max_seq_len / 128) + 1 of them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmap.config import ModelConfig
from jaxmap.engine import layers, program_store, remote_experts, scan_stage
from jaxmap.engine.multihost import put, to_local
from jaxmap.engine.sampling import SamplerShape, mark_seen, sample
from jaxmap.families import LayerDesign, family_of
from jaxmap.families.rope import attention_factor, inverse_frequencies
from jaxmap.materialize.model import Stage
from jaxmap.planning.memory import prefill_chunk as prefill_chunk_for
from jaxmap.quant import is_quantized
from jaxmap.quant.qtensor import leaf_shardings

log = logging.getLogger(__name__)

UNROLL_MAX_LAYERS = 48
MIN_ATTEND_BUCKET = 128
LayerMode = str  # "unrolled" | "per_layer" | "scan"


def choose_layer_mode(num_layers: int, requested: str = "auto", quantized_on_cpu: bool = False) -> LayerMode:
    """The layer mode of a resident stage. ``auto``: scan a stage whose layer weights are quantized and computed on
    one CPU device (measured on the default model's Q4_1 and Q8_0: decode as fast or faster, first token 3-8x sooner,
    compile 8 s -> 0.6 s, less peak memory); unroll float stages (scan slices each layer's float weights out of the
    stack at every step: float32 decode 35 -> 19 tokens/s) unless they are deep, then run them per layer."""
    if requested in ("unrolled", "per_layer", "scan"):
        return requested
    if quantized_on_cpu:
        return "scan"
    return "unrolled" if num_layers <= UNROLL_MAX_LAYERS else "per_layer"


def _quantized_on_cpu(stage: Stage) -> bool:
    """Whether the stage computes on one CPU device and its layers' projections are quantized (QTensors). One
    device: what the scan-vs-unrolled measurements covered; tensor-parallel CPU stages keep unrolling until measured."""
    sharding = stage.activation_sharding
    devices = sharding.device_set if hasattr(sharding, "device_set") else {sharding}
    if len(devices) != 1 or getattr(next(iter(devices)), "platform", None) != "cpu":
        return False
    layers = stage.params.get("layers") or []
    return bool(layers) and any(is_quantized(v) for v in layers[0].values())


def attend_bucket(length: int, max_seq_len: int) -> int:
    """Smallest power-of-two bucket (>= 128) holding ``length`` slots, capped at ``max_seq_len``."""
    bucket = MIN_ATTEND_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_seq_len)


def prefill_bucket(length: int, max_seq_len: int) -> int:
    """Padded prompt length: powers of two from 8 up to 256, then multiples of 256, capped at ``max_seq_len``.

    Prefill is compute-bound, so padding a 5-token prompt to 16 would triple its cost; each bucket is one compiled
    program (kept by the persistent compilation cache).
    """
    bucket = 8
    while bucket < length and bucket < 256:
        bucket *= 2
    if bucket < length:
        bucket = -(-length // 256) * 256
    return min(bucket, max_seq_len)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static part of one stage call: what selects a compiled program."""

    batch: int
    n_tokens: int
    attend_len: int
    all_logits: bool
    sampler: SamplerShape
    history: int = 0  # a prefill chunk after the first: the cache slots (a bucket) it reads beside its own keys


@dataclasses.dataclass
class CompileStats:
    seconds: float = 0.0
    programs: int = 0


class Engine:
    """Runs prefill and decode steps over stages; knows nothing of tokenizers or text."""

    def __init__(self, config: ModelConfig, stages: Sequence[Stage], dtype: jnp.dtype, max_seq_len: int,
                 layer_mode: str = "auto", prefill_chunk: int | None = None):
        self.config = config
        self.stages = list(stages)
        self.dtype = jnp.dtype(dtype)
        for stage in self.stages:
            stage.dtype = jnp.dtype(stage.dtype or self.dtype)
            # Streamed stages run one program per layer (it bounds device memory to about two layers); the others
            # scan when quantized on the CPU, else unroll unless they are deep (see choose_layer_mode).
            # Layers with routed experts apart run as several programs (engine/remote_experts.py): per layer too.
            stage.mode = ("per_layer" if stage.streamed or getattr(stage, "apart", None)
                          else choose_layer_mode(stage.num_layers, layer_mode, _quantized_on_cpu(stage)))
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk_for(max_seq_len, prefill_chunk)  # prompt tokens per prefill step
        family = family_of(config)
        # Each layer's blocks (a hashable design): layers sharing one share their compiled per-layer program.
        self.designs = [family.layer_design(config, i) for i in range(config.num_hidden_layers)]
        self.outer_design = family.outer_design(config)
        self.inv_freq = inverse_frequencies(config, max_seq_len=max_seq_len)  # LongRoPE: long or short, once
        self.rope_scale = attention_factor(config)
        self.local_inv_freq = inverse_frequencies(config, local=True) if any(d.rope_local for d in self.designs) \
            else None
        # Cache slots per layer: a sliding-window layer keeps a ring of its window, the others the whole context.
        self.kv_slots = [family.kv_slots(config, i, max_seq_len) for i in range(config.num_hidden_layers)]
        for stage in self.stages:  # scan: the stage's alike layers stacked (engine/scan_stage.py), else unrolled
            if stage.mode == "scan":
                stage.scan = scan_stage.prepare(stage, self.designs[stage.start:stage.end], self.kv_slots)
                if stage.scan is None:
                    log.debug("stage %d-%d: no run of alike layers to scan; unrolled", stage.start, stage.end)
                    stage.mode = "unrolled"
        self.compile_stats = CompileStats()
        self._programs: dict[tuple, Callable] = {}
        self._cache_pool: dict[int, list] = {}
        self._called: set[tuple] = set()
        self._stored: dict[tuple, Callable | None] = {}  # first-called stage programs read from the program store
        self.multi_process = jax.process_count() > 1

    # ---- state ------------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int) -> list[list[tuple[jax.Array, jax.Array]]]:
        """KV buffers [batch, kv_heads, max_seq_len, head_dim] for every layer, on each stage's devices.

        Buffers handed back with :meth:`release_cache` are reused without zeroing: a step only ever attends to
        slots it has written in this generation (the mask), so stale slots are never read.
        """
        pooled = self._cache_pool.pop(batch, None)
        if pooled is not None:
            return pooled
        caches = []
        for i, stage in enumerate(self.stages):
            if stage.mode == "scan":
                caches.append(scan_stage.new_cache(
                    stage.scan, stage, batch, self.config.num_key_value_heads, self.config.head_dim, self.kv_slots,
                    functools.partial(self._zeros, i, stage.dtype)))
                continue
            stage_caches = []
            for layer in range(stage.start, stage.end):
                slots = self.kv_slots[layer]
                key = ("zeros", i, batch, slots)
                if key not in self._programs:
                    shape = (batch, self.config.num_key_value_heads, slots, self.config.head_dim)
                    self._programs[key] = jax.jit(functools.partial(jnp.zeros, shape, stage.dtype),
                                                  out_shardings=stage.cache_sharding)
                make = self._programs[key]
                stage_caches.append((make(), make()))
            caches.append(stage_caches)
        return caches

    def _zeros(self, i: int, dtype, shape: tuple, sharding) -> jax.Array:
        key = ("zeros", i, shape, dtype)
        if key not in self._programs:
            self._programs[key] = jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)
        return self._programs[key]()

    def insert_row(self, caches: list, row_caches: list, row: int, n_slots: int) -> list:
        """Copy the first ``n_slots`` cache slots of a batch-1 cache (a newcomer's prefill) into row ``row`` of a
        batched cache, in place (the batched buffers are donated); continuous batching's join."""
        return self._copy_row("insert", caches, row_caches, row, n_slots)

    def extract_row(self, caches: list, row: int, row_caches: list, n_slots: int) -> list:
        """Copy the first ``n_slots`` cache slots of row ``row`` of a batched cache into a batch-1 cache, in place
        (its buffers are donated); the server's prefix cache: a newcomer starts from a prompt prefix whose KV another
        request's prefill left in that row."""
        return self._copy_row("extract", caches, row_caches, row, n_slots)

    def _copy_row(self, kind: str, batched: list, single: list, row: int, n_slots: int) -> list:
        """Both directions between row ``row`` of a batched cache and a batch-1 cache; returns the destination
        (``batched`` for "insert", ``single`` for "extract"), whose buffers the copy donates."""
        out = []
        row_arr = jnp.asarray(row, jnp.int32)
        for i, (stage_batched, stage_single) in enumerate(zip(batched, single, strict=True)):
            at = put(row_arr, self.stages[i].activation_sharding)
            new = []
            for (kb, vb), (ks, vs) in zip(stage_batched, stage_single, strict=True):
                n = min(n_slots, kb.shape[-2])  # [batch, kv_heads, slots, head_dim], or a scan's stack of them
                key = (f"{kind}_row", i, kb.shape, n)
                if key not in self._programs:
                    self._programs[key] = jax.jit(functools.partial(_copy_row_program, kind=kind, n=n),
                                                  donate_argnums=(0, 1))
                dst, src = ((kb, vb), (ks, vs)) if kind == "insert" else ((ks, vs), (kb, vb))
                new.append(self._programs[key](*dst, *src, at))
            out.append(new)
        return out

    def release_cache(self, caches: list) -> None:
        """Keep one set of buffers per batch size for the next generation (saves allocating and zeroing them)."""
        # the first stage may hold no layers (embeddings placed on their own devices): look past empty stages
        first = next((stage_caches[0][0] for stage_caches in caches if stage_caches), None)
        if first is not None:
            self._cache_pool[first.shape[-4]] = caches

    # ---- programs ---------------------------------------------------------------------------------------------------
    def _program(self, stage_index: int, shape: StepShape, part: str, design: LayerDesign | None = None) -> Callable:
        key = (stage_index, shape, part, design)
        if key not in self._programs:
            self._programs[key] = self._build(self.stages[stage_index], shape, part, design)
        return self._programs[key]

    def _build(self, stage: Stage, shape: StepShape, part: str, design: LayerDesign | None) -> Callable:
        config, dtype, outer = self.config, stage.dtype, self.outer_design
        inv_freq, local_inv_freq, rope_scale = self.inv_freq, self.local_inv_freq, self.rope_scale
        stage_designs = self.designs[stage.start:stage.end]

        def enter(params, x, start, pad, last_index):
            x = layers.embed(params, x, dtype, outer) if stage.is_first else x.astype(dtype)
            ctx = layers.attention_context(start, pad, shape.n_tokens, shape.attend_len, inv_freq, local_inv_freq,
                                           end=start + last_index + 1, rope_scale=rope_scale)
            return x, ctx

        def layer(p, x, k_cache, v_cache, start, ctx, layer_design=design):
            x, k_cache, v_cache = layers.decoder_layer(p, x, k_cache, v_cache, start, ctx, shape.attend_len, config,
                                                       layer_design, history=shape.history)
            (k_cache, v_cache), = scan_stage.pin_caches([(k_cache, v_cache)], stage)  # as they came in (ep)
            return x, k_cache, v_cache

        def leave(params, x, start, last_index, seen, values, key):
            h = x if shape.all_logits else jax.lax.dynamic_index_in_dim(x, last_index, axis=1, keepdims=False)
            logits = layers.lm_head(params, h, config, outer)
            step_logits = logits[:, last_index] if shape.all_logits else logits
            # keyed by the sampled token's slot (the same stream however the prompt was chunked); with a slot per
            # row (continuous batching) by their sum
            token = sample(step_logits, seen, values, jax.random.fold_in(key, jnp.sum(start) + last_index),
                           shape.sampler)
            if seen is not None:
                seen = mark_seen(seen, token)
            return token, logits, seen

        if part == "stage":  # unrolled: the whole stage in one program
            def run(params, x, caches, start, pad, last_index, seen, values, key):
                x, ctx = enter(params, x, start, pad, last_index)
                new_caches = []
                for p, (kc, vc), d in zip(params["layers"], caches, stage_designs, strict=True):
                    x, kc, vc = layer(p, x, kc, vc, start, ctx, d)
                    new_caches.append((kc, vc))
                if not stage.is_last:
                    return x, new_caches
                token, logits, seen = leave(params, x, start, last_index, seen, values, key)
                return token, logits, new_caches, seen

            return jax.jit(run, donate_argnames=("caches", "seen"))
        if part == "scan":  # the stage's alike layers in a lax.scan (engine/scan_stage.py), in one program
            def run_scan(params, x, caches, start, pad, last_index, seen, values, key):
                x, ctx = enter(params, x, start, pad, last_index)
                x, new_caches = scan_stage.run_layers(stage.scan, params["segments"], caches, x, start, ctx,
                                                      stage_designs, shape, config)
                new_caches = scan_stage.pin_caches(new_caches, stage)
                if not stage.is_last:
                    return x, new_caches
                token, logits, seen = leave(params, x, start, last_index, seen, values, key)
                return token, logits, new_caches, seen

            return jax.jit(run_scan, donate_argnames=("caches", "seen"))
        if part == "enter":
            return jax.jit(enter)
        if part == "layer":
            return jax.jit(layer, donate_argnames=("k_cache", "v_cache"))
        if part == "stream":  # host tier: this layer's compute, and the next layer's move into device memory
            targets = stage.layer_shardings

            def stream(p, p_next_host, x, k_cache, v_cache, start, ctx):
                x, k_cache, v_cache = layer(p, x, k_cache, v_cache, start, ctx)
                return x, k_cache, v_cache, jax.device_put(p_next_host, targets)

            return jax.jit(stream, donate_argnames=("k_cache", "v_cache"))
        if part == "raw_layer":  # disk tier: weights arrive as stored (Hugging Face layout, stored dtype)
            specs, targets = stage.disk.specs[stage.start], stage.layer_shardings

            def raw_layer(raw, x, k_cache, v_cache, start, ctx):
                return layer(weights_from_raw(raw, specs, targets, dtype), x, k_cache, v_cache, start, ctx)

            return jax.jit(raw_layer, donate_argnames=("k_cache", "v_cache"))
        if part == "leave":
            return jax.jit(leave, donate_argnames=("seen",))
        if part in remote_experts.PARTS:
            return remote_experts.build(part, shape, config, design, shape.history)
        raise ValueError(part)

    def _call(self, stage_index: int, shape: StepShape, part: str, *args, design: LayerDesign | None = None) -> Any:
        """Call a program through jit's C++ fast path.

        The first call of each program is timed to completion and counted as compile time: tracing, compiling or
        loading from the persistent compilation cache, plus one run. (An AOT ``lower().compile()`` executable is
        dispatched from Python and cost ~2 ms per call with SmolLM2's ~330 arguments, 8% of a decode step.)
        """
        # float32 means float32: on GPUs jax's default lets f32 matmuls run in TF32 (logits moved by ~2e-2 on
        # an H100); "highest" keeps them exact and changes nothing on CPU.
        precision = "highest" if self.stages[stage_index].dtype == jnp.float32 else None
        key = (stage_index, shape, part, design)
        first = key not in self._called
        t0 = time.perf_counter()
        with jax.default_matmul_precision(precision):
            stored = self._stored.get(key) if not first else self._store(stage_index, shape, part, design, args,
                                                                          precision)
            if stored is not None:
                out = stored(*jax.tree.leaves(list(args)))
            else:
                out = self._program(stage_index, shape, part, design)(*args)
        if first:
            jax.block_until_ready(out)
            self._called.add(key)
            self.compile_stats.seconds += time.perf_counter() - t0
            self.compile_stats.programs += 1
        return out

    def _store(self, stage_index: int, shape: StepShape, part: str, design, args, precision) -> Callable | None:
        """A whole unrolled stage's step from the program store (see engine/program_store.py): a warm start reads
        the traced program instead of tracing every layer again. Per-layer programs are small and stay traced."""
        key = (stage_index, shape, part, design)
        stored = None
        if part in ("stage", "scan") and program_store.store_root() is not None and not self.multi_process:
            stage = self.stages[stage_index]
            what = (repr(self.config), stage.start, stage.end, stage.is_first, stage.is_last, str(stage.dtype),
                    shape, part, tuple(self.designs[stage.start:stage.end]), self.outer_design, self.max_seq_len,
                    precision, *(scan_stage.key_parts(stage.scan) if part == "scan" else ()))
            run = self._program(stage_index, shape, part, design).__wrapped__
            # the stage program donates its caches and seen (arguments 2 and 6)
            stored = program_store.load_or_export(program_store.program_key(what, args), run, args, donate=(2, 6))
        self._stored[key] = stored
        return stored

    def compiled_text(self, stage_index: int, batch: int = 1, n_tokens: int = 1, attend_len: int | None = None) -> str:
        """The optimised HLO of one stage's step program (for tests and for reading what XLA made of a layout)."""
        return self.compiled(stage_index, batch, n_tokens, attend_len).as_text()

    def compiled(self, stage_index: int, batch: int = 1, n_tokens: int = 1, attend_len: int | None = None):
        """One stage's compiled step program (``jax.stages.Compiled``: its HLO, XLA's memory analysis)."""
        stage = self.stages[stage_index]
        attend_len = attend_len or min(MIN_ATTEND_BUCKET, self.max_seq_len)
        shape = StepShape(batch, n_tokens, attend_len, False, SamplerShape())
        caches = self.new_cache(batch)[stage_index]
        x = (jnp.zeros((batch, n_tokens), jnp.int32) if stage.is_first
             else jnp.zeros((batch, n_tokens, self.config.hidden_size), stage.dtype))
        x = jax.device_put(x, stage.activation_sharding)
        put = functools.partial(jax.device_put, device=stage.activation_sharding)
        args = [self._stage_params(stage), x, caches, put(jnp.int32(0)), put(jnp.zeros(batch, jnp.int32))]
        if stage.is_last:
            args += [put(jnp.int32(0)), None, put(jnp.ones(3, jnp.float32)), put(jax.random.key(0))]
        else:
            args += [put(jnp.int32(0)), None, None, None]
        if stage.mode not in ("unrolled", "scan"):
            raise ValueError("compiled reads unrolled and scan stages; per-layer stages compile one program per part")
        part = "scan" if stage.mode == "scan" else "stage"
        return self._program(stage_index, shape, part).lower(*args).compile()

    @staticmethod
    def _stage_params(stage: Stage) -> dict:
        """What a whole-stage program takes: the stage's parameters, a scan stage's by segment."""
        if stage.mode != "scan":
            return stage.params
        return {**_outer(stage.params), "segments": stage.scan.params}

    # ---- steps ------------------------------------------------------------------------------------------------------
    def step(self, caches, inputs: jax.Array, start: int, pad: jax.Array, last_index: int, seen, values, key,
             shape: StepShape):
        """Run ``shape.n_tokens`` tokens through every stage; returns (next token, logits, caches, seen)."""
        x = inputs
        start_arr = jnp.asarray(start, jnp.int32)
        last_arr = jnp.asarray(last_index, jnp.int32)
        out_caches = []
        token = logits = None
        for i, stage in enumerate(self.stages):
            x = put(x, stage.activation_sharding)
            stage_pad = put(pad, stage.activation_sharding)
            start_i = put(start_arr, stage.activation_sharding)
            if stage.mode in ("unrolled", "scan"):
                part = "scan" if stage.mode == "scan" else "stage"
                args = [self._stage_params(stage), x, caches[i], start_i, stage_pad]
                if stage.is_last:
                    seen = None if seen is None else put(seen, stage.activation_sharding)
                    token, logits, new, seen = self._call(
                        i, shape, part, *args, put(last_arr, stage.activation_sharding), seen,
                        put(values, stage.activation_sharding),
                        put(key, stage.activation_sharding))
                else:
                    x, new = self._call(i, shape, part, *args, put(last_arr, stage.activation_sharding), None,
                                        None, None)
            else:
                x, ctx = self._call(i, shape, "enter", _outer(stage.params), x, start_i, stage_pad,
                                    put(last_arr, stage.activation_sharding))
                if stage.streamed:
                    x, new = self._streamed_layers(i, stage, shape, x, caches[i], start_i, ctx)
                else:
                    new = []
                    apart = getattr(stage, "apart", None) or {}
                    for j, (p, (kc, vc), d) in enumerate(zip(stage.params["layers"], caches[i],
                                                             self.designs[stage.start:stage.end], strict=True)):
                        if stage.start + j in apart:  # routed experts apart: engine/remote_experts.py
                            x, kc, vc = remote_experts.run_layer(self, i, stage, shape, apart[stage.start + j], p, x,
                                                                 kc, vc, start_i, ctx, d)
                        else:
                            x, kc, vc = self._call(i, shape, "layer", p, x, kc, vc, start_i, ctx, design=d)
                        new.append((kc, vc))
                        if stage.sync:
                            x.block_until_ready()
                if stage.is_last:
                    seen = None if seen is None else put(seen, stage.activation_sharding)
                    token, logits, seen = self._call(
                        i, shape, "leave", _outer(stage.params), x, start_i,
                        put(last_arr, stage.activation_sharding), seen,
                        put(values, stage.activation_sharding),
                        put(key, stage.activation_sharding))
            out_caches.append(new)
            if stage.sync:
                jax.block_until_ready(token if stage.is_last else x)
        if self.multi_process:  # the last stage may live on another process: every process gets the outputs
            token, logits, seen = to_local(token), to_local(logits), to_local(seen)
        return token, logits, out_caches, seen

    def _streamed_layers(self, i: int, stage: Stage, shape: StepShape, x, caches, start, ctx):
        """Run a host- or disk-tier stage: at most two layers' weights in device memory (three while the
        program of the previous layer is still finishing), each next layer's move overlapping this one's compute."""
        new = []
        n = stage.num_layers
        pending = None  # the previous layer's output: waited on so that dispatch stays one layer ahead at most
        if stage.memory_kind == "host":
            host = stage.params["layers"]
            current = jax.device_put(host[0], stage.layer_shardings)
            for j, (kc, vc) in enumerate(caches):
                if j + 1 < n:
                    x, kc, vc, following = self._call(i, shape, "stream", current, host[j + 1], x, kc, vc, start,
                                                      ctx, design=self.designs[stage.start + j])
                else:
                    x, kc, vc = self._call(i, shape, "layer", current, x, kc, vc, start, ctx,
                                           design=self.designs[stage.start + j])
                    following = None
                new.append((kc, vc))
                if pending is not None:
                    pending.block_until_ready()
                pending, current = x, following
            return x, new
        disk, put = stage.disk, functools.partial(jax.device_put, device=stage.activation_sharding)
        current = put(disk.read(stage.start))
        for j, (kc, vc) in enumerate(caches):
            x, kc, vc = self._call(i, shape, "raw_layer", current, x, kc, vc, start, ctx,
                                   design=self.designs[stage.start + j])
            new.append((kc, vc))
            following = put(disk.read(stage.start + j + 1)) if j + 1 < n else None  # read while layer j computes
            if pending is not None:
                pending.block_until_ready()
                disk.release(stage.start + j - 1)
            pending, current = x, following
        x.block_until_ready()
        disk.release(stage.end - 1)
        return x, new


def weights_from_raw(raw: dict, specs: dict, targets: dict, dtype) -> dict:
    """A disk-tier layer's parameters as the model takes them, from the tensors as stored (inside a jit: Hugging
    Face ``[out, in]`` layout and stored dtype in, jaxmap's layout and compute dtype out, placed on ``targets``;
    quantized weights arrive as QTensors and stay so)."""
    p = {}
    for name, spec in specs.items():
        if is_quantized(raw[name]):  # stored quantized (ISQ on the disk tier): used as it is, its leaves placed
            # as the weight's split needs; from the layer's own QTensor, since layers of one stage may differ in type
            leaf_targets = leaf_shardings(spec, targets[name], raw[name])
            p[name] = jax.tree.map(jax.lax.with_sharding_constraint, raw[name], leaf_targets)
            continue
        w = raw[name].astype(dtype).reshape(spec.hf_shape)
        w = (w.T if spec.transpose else w).reshape(spec.shape)
        p[name] = jax.lax.with_sharding_constraint(w, targets[name])
    return p


def _copy_row_program(dst_k, dst_v, src_k, src_v, at, *, kind: str, n: int):
    """The first ``n`` slots of a batch-1 cache into row ``at`` ("insert"), or of row ``at`` into a batch-1 cache
    ("extract")."""
    zero = jnp.int32(0)
    lead = (zero,) * (dst_k.ndim - 4)  # a scan stage's caches are stacks [layers, batch, ...]
    if kind == "insert":
        return tuple(jax.lax.dynamic_update_slice(d, s[..., :n, :], (*lead, at, zero, zero, zero))
                     for d, s in ((dst_k, src_k), (dst_v, src_v)))
    return tuple(jax.lax.dynamic_update_slice(d, jax.lax.dynamic_slice_in_dim(s, at, 1, axis=s.ndim - 4)[..., :n, :],
                                              (*lead, zero, zero, zero, zero))
                 for d, s in ((dst_k, src_k), (dst_v, src_v)))


def _outer(params: dict) -> dict:
    """A stage's parameters without the per-layer list (what enter/leave need)."""
    return {k: v for k, v in params.items() if k != "layers"}
