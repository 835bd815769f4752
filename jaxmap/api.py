"""The Python API the command line is built on: ``jaxmap.load(...)`` and ``Model.generate(...)``."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmap.config import ModelConfig, list_presets
from jaxmap.config.dtypes import default_dtype, parse_dtype
from jaxmap.config.hardware import Hardware
from jaxmap.engine.engine import Engine, StepShape, attend_bucket, prefill_bucket
from jaxmap.engine.host_memory import return_freed_heap
from jaxmap.engine.phases import Phases, jax_totals, listen_to_jax
from jaxmap.engine.sampling import SamplingParams, mark_seen
from jaxmap.errors import UserError
from jaxmap.families import family_of, preset_config
from jaxmap.loading import default_model_path, open_source
from jaxmap.loading.harmony import parse as parse_harmony
from jaxmap.loading.imatrix_file import Imatrix
from jaxmap.loading.packaged import PACKAGED, packaged_model_path
from jaxmap.loading.random_source import RandomSource
from jaxmap.loading.tokenizer import Tokenizer, encode_prompt
from jaxmap.materialize import isq as isq_mod
from jaxmap.materialize.model import materialize_model
from jaxmap.planning.device_map import DeviceMap
from jaxmap.planning.isq_types import ensure_types
from jaxmap.planning.planner import plan as plan_device_map
from jaxmap.planning.wishes import make_wish

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    compile_s: float
    total_s: float


@dataclasses.dataclass
class GenerationResult:
    prompt: str | None
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "length" (max_new_tokens) or "context" (max_seq_len reached)
    stats: GenerationStats
    #: harmony chat replies (gpt-oss with chat=True) only: ``text`` is then the final channel, ``reasoning`` the
    #: analysis channel and ``tool_calls`` the messages addressed to a tool ([{"name", "arguments"}])
    reasoning: str | None = None
    tool_calls: list[dict] | None = None

    def to_json(self) -> dict:
        out = {
            "prompt": self.prompt,
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": dataclasses.asdict(self.stats),
        }
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
            out["tool_calls"] = self.tool_calls
        return out


class Model:
    """A loaded model: config, tokenizer and an engine whose weights are already placed."""

    def __init__(self, config: ModelConfig, engine: Engine, tokenizer: Tokenizer | None, source_path: str):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.source_path = source_path
        self.device_map: DeviceMap | None = None
        #: seconds per start-up phase (open, plan, load, engine), then each generate's (prefill, decode, jax's
        #: trace / lower / compile); logged at DEBUG (``-v``)
        self.phases = Phases()

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def dtype(self) -> jnp.dtype:
        return self.engine.dtype

    # ---- text in, text out ------------------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False, reasoning_effort: str | None = None) -> list[int]:
        """Token ids of ``prompt``; with ``chat`` wrapped in the chat template as one user message.
        ``reasoning_effort`` (low, medium, high) goes to templates that read it (harmony, gpt-oss's)."""
        if self.tokenizer is None:
            raise UserError(f"{self.source_path} has no tokenizer; pass token ids instead of text")
        return encode_prompt(self.tokenizer, prompt, chat, reasoning_effort)

    def eos_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        return ids

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat: bool = False,
        stop_at_eos: bool = True,
        on_token: Callable[[int, int], None] | None = None,
        reasoning_effort: str | None = None,
        **sampling_kwargs,
    ) -> list[GenerationResult]:
        """Generate for a batch of prompts (text, or lists of token ids) of any lengths; one result per prompt.

        ``on_token(row, token_id)`` is called for every generated token as soon as it reaches the host. With
        ``chat`` on a harmony model (gpt-oss), each result's text is the reply's final channel and ``reasoning``
        its analysis channel; ``reasoning_effort`` (low, medium, high) goes to the chat template.
        """
        if sampling is not None and sampling_kwargs:
            raise UserError(f"pass either sampling= or sampling keywords ({', '.join(sampling_kwargs)}), not both")
        try:
            sampling = sampling or SamplingParams(**sampling_kwargs)
        except TypeError as exc:
            raise UserError(f"generate(): {exc}; sampling keywords are {SAMPLING_KEYWORDS}") from None
        _check_count("max_new_tokens", max_new_tokens)
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[str | None] = []
        batch_ids: list[list[int]] = []
        for p in _prompt_list(prompts):
            if isinstance(p, str):
                texts.append(p)
                batch_ids.append(self.encode(p, chat=chat, reasoning_effort=reasoning_effort))
            else:
                texts.append(None)
                batch_ids.append(_token_ids(p))
        if chat and any(t is None for t in texts):
            log.warning("chat=True formats text prompts only; token-id prompts are used as given")
        rows, stats = self._generate_ids(batch_ids, max_new_tokens, sampling, stop_at_eos, on_token)
        results = []
        harmony = chat and self.tokenizer is not None and self.tokenizer.harmony
        for text, ids, (tokens, reason) in zip(texts, batch_ids, rows, strict=True):
            decoded = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
            row_stats = dataclasses.replace(stats, prompt_tokens=len(ids), generated_tokens=len(tokens))
            result = GenerationResult(text, ids, tokens, decoded, reason, row_stats)
            if harmony and text is not None:
                reply = parse_harmony(self.tokenizer.decode(tokens, skip_special_tokens=False))
                result.text, result.reasoning = reply.content, reply.reasoning
                result.tool_calls = [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
            results.append(result)
        return results

    # ---- token ids in, token ids out -------------------------------------------------------------------------------
    def _pack(self, batch_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad to the longest prompt L: tokens [B, L] and each row's padding [B]."""
        longest = max(len(ids) for ids in batch_ids)
        tokens = np.zeros((len(batch_ids), longest), np.int32)
        pads = np.zeros(len(batch_ids), np.int32)
        for row, ids in enumerate(batch_ids):
            pads[row] = longest - len(ids)
            tokens[row, pads[row]:] = ids
        return tokens, pads

    def _prefill(self, tokens: np.ndarray, pads, seen, values, key, sampler, all_logits: bool = False,
                 on_logits: Callable[[np.ndarray], None] | None = None):
        """Write the prompts' KV into a fresh cache, ``engine.prefill_chunk`` tokens per step; returns (the first
        sampled token, caches, seen, the last step's logits).

        Each chunk after the first attends to the slots the chunks before it wrote (a length bucket of them), so
        a step's temporaries grow with the chunk, not with the prompt; only the last chunk is padded (to a prefill
        bucket) and samples. ``on_logits`` receives each chunk's logits of its real positions ([B, n, vocab],
        with ``all_logits``)."""
        caches = self.engine.new_cache(tokens.shape[0])
        token = logits = None
        for start in range(0, tokens.shape[1], self.engine.prefill_chunk):
            token, logits, caches, seen = self._prefill_chunk(caches, tokens, start, pads, seen, values, key, sampler,
                                                              all_logits, on_logits)
        return token, caches, seen, logits

    def _prefill_chunk(self, caches, tokens: np.ndarray, start: int, pads, seen, values, key, sampler,
                       all_logits: bool = False, on_logits: Callable[[np.ndarray], None] | None = None):
        """One step of :meth:`_prefill`: the chunk of ``tokens`` [B, L] at slots ``start ..`` (``start`` a multiple
        of ``engine.prefill_chunk``), into ``caches``; returns (token, logits, caches, seen). Only the last chunk
        samples (and takes ``seen``); the server runs these one at a time between decode steps."""
        engine = self.engine
        batch, longest = tokens.shape
        chunk = engine.prefill_chunk
        real = min(chunk, longest - start)
        last = start + real == longest
        n_slots = real if not last else prefill_bucket(real, min(chunk, self.max_seq_len - start))
        piece = np.zeros((batch, n_slots), np.int32)
        piece[:, :real] = tokens[:, start:start + real]
        history = 0 if start == 0 else attend_bucket(start, self.max_seq_len)
        greedy = SamplingParams().shape
        shape = StepShape(batch, n_slots, n_slots, all_logits, sampler if last else greedy, history)
        token, logits, caches, new_seen = engine.step(caches, jnp.asarray(piece), start, pads, real - 1,
                                                      seen if last else None, values, key, shape)
        if on_logits is not None:
            on_logits(np.asarray(logits)[:, :real])
        return token, logits, caches, new_seen if last else seen

    def _check_prompts(self, batch_ids: list[list[int]]) -> int:
        if not batch_ids:
            raise UserError("no prompt given")
        for ids in batch_ids:
            if not ids:
                raise UserError("a prompt is empty (it encodes to no tokens)")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        longest = max(len(ids) for ids in batch_ids)
        if longest > self.max_seq_len:
            context = self.config.max_position_embeddings
            how = (f"shorten it (the model's context is {context} tokens)" if self.max_seq_len >= context else
                   f"shorten it or raise --max-seq-len (the model allows up to {context})")
            raise UserError(f"the prompt is {longest} tokens, longer than --max-seq-len {self.max_seq_len}; {how}")
        return longest

    def _generate_ids(self, batch_ids, max_new_tokens, sampling: SamplingParams, stop_at_eos, on_token):
        _check_count("max_new_tokens", max_new_tokens)
        longest = self._check_prompts(batch_ids)
        engine, batch = self.engine, len(batch_ids)
        shape = sampling.shape
        tokens, pads = self._pack(batch_ids)
        values, key = sampling.values(), jax.random.key(sampling.seed)
        seen = None
        if shape.use_penalty:
            valid = np.where(np.arange(longest)[None, :] >= pads[:, None], tokens, -1)
            seen = mark_seen(jnp.zeros((batch, self.config.vocab_size), jnp.bool_), jnp.asarray(valid))
        eos = self.eos_ids() if stop_at_eos else set()
        pads_dev = jnp.asarray(pads)

        compile0 = engine.compile_stats.seconds
        jax0 = jax_totals()
        t_start = time.perf_counter()
        token, caches, seen, _ = self._prefill(tokens, pads_dev, seen, values, key, shape)
        first = np.asarray(token)
        t_first = time.perf_counter()
        prefill_compile = engine.compile_stats.seconds - compile0

        outputs: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        done = np.zeros(batch, bool)
        host_token, dev_token = first, token
        steps = 0
        for i in range(max_new_tokens):
            slot = longest + i  # the cache slot the current token is written to when fed back
            more = i + 1 < max_new_tokens and slot < self.max_seq_len
            if more:  # dispatch the next step before reading this token: host work overlaps device work
                step_shape = StepShape(batch, 1, attend_bucket(slot + 1, self.max_seq_len), False, shape)
                next_dev, _, caches, seen = engine.step(caches, dev_token[:, None], slot, pads_dev, 0, seen, values,
                                                        key, step_shape)
            if i > 0:
                host_token = np.asarray(dev_token)
            for row in range(batch):
                if done[row]:
                    continue
                tok = int(host_token[row])
                if tok in eos:
                    done[row], reasons[row] = True, "eos"
                    continue
                outputs[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
            if done.all():
                break
            if not more:
                if i + 1 < max_new_tokens:
                    for row in np.flatnonzero(~done):
                        reasons[row] = "context"
                    log.warning("stopped at --max-seq-len %d; raise it to generate more", self.max_seq_len)
                break
            dev_token = next_dev
            steps += 1
        t_end = time.perf_counter()
        engine.release_cache(caches)

        compile_total = engine.compile_stats.seconds - compile0
        self._report_phases(t_start, t_first, t_end, jax0, compile_total)
        decode_compile = compile_total - prefill_compile
        prefill_time = max(t_first - t_start - prefill_compile, 1e-9)
        decode_time = max(t_end - t_first - decode_compile, 1e-9)
        stats = GenerationStats(
            prompt_tokens=sum(len(ids) for ids in batch_ids),
            generated_tokens=sum(len(o) for o in outputs),
            ttft_s=t_first - t_start,
            prefill_tokens_per_s=sum(len(ids) for ids in batch_ids) / prefill_time,
            decode_tokens_per_s=(batch * steps / decode_time) if steps else 0.0,
            compile_s=compile_total,
            total_s=t_end - t_start,
        )
        return list(zip(outputs, reasons, strict=True)), stats

    def _report_phases(self, t_start: float, t_first: float, t_end: float, jax0: dict, compile_total: float) -> None:
        """One DEBUG line for this call: prefill (to the first token, its programs' first calls included), decode, and
        of those, the first calls of programs (``programs``: trace, lower, compile or cache load, one run) with jax's
        own trace / lower / backend-compile seconds."""
        run = Phases()
        run.add("prefill", t_first - t_start)
        run.add("decode", t_end - t_first)
        run.add("programs", compile_total)
        now = jax_totals()
        for name, total in now.items():
            run.add(name, total - jax0.get(name, 0.0))
        for name, seconds in run.seconds.items():
            self.phases.seconds[name] = seconds
        run.report("generate")

    def forward_logits(self, batch_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Float32 logits at every prompt position, one [len, vocab] array per prompt (for checks and scoring)."""
        if any(isinstance(p, str) for p in _prompt_list(batch_ids)):
            raise UserError("forward_logits takes token ids: encode text first (model.encode(text))")
        batch_ids = [_token_ids(ids) for ids in _prompt_list(batch_ids)]
        self._check_prompts(batch_ids)
        tokens, pads = self._pack(batch_ids)
        pieces: list[np.ndarray] = []
        _, caches, _, _ = self._prefill(tokens, jnp.asarray(pads), None, SamplingParams().values(), jax.random.key(0),
                                     SamplingParams().shape, all_logits=True, on_logits=pieces.append)
        self.engine.release_cache(caches)
        logits = np.concatenate(pieces, axis=1)
        return [logits[row, pads[row]:] for row in range(len(batch_ids))]


SAMPLING_KEYWORDS = "temperature, top_k, top_p, repetition_penalty, seed"


def _check_count(name: str, value) -> None:
    """A count such as ``max_new_tokens``: a whole number of at least 1 (named as keyword and as flag)."""
    if _whole(value, name) < 1:
        raise UserError(f"{name} (--{name.replace('_', '-')}) must be a whole number >= 1, got {value!r}")


def _prompt_list(prompts) -> list:
    """The batch as a list of prompts; a flat list of ids (one prompt, unwrapped) is refused rather than guessed."""
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise UserError(f"prompts must be a string, a list of strings or a list of token-id lists; got "
                        f"{type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(p, (numbers.Integral, np.integer)) for p in prompts):
        raise UserError("prompts is one list of token ids: wrap it in a list for a batch of one ([[1, 2, 3]])")
    return prompts


def _token_ids(prompt) -> list[int]:
    """One prompt's token ids as Python ints; floats (a float array passed by mistake) are refused, not truncated."""
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (Sequence, np.ndarray)):
        raise UserError(f"a prompt must be a string or a list of token ids; got {type(prompt).__name__}")
    ids = list(prompt)
    bad = [t for t in ids if not isinstance(t, (numbers.Integral, np.integer)) or isinstance(t, bool)]
    if bad:
        raise UserError(f"token ids must be whole numbers; got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(t) for t in ids]


def resolve_source(model: str | Path | None, seed: int = 0):
    """A weight source for ``-m``: a path, ``preset:NAME`` (random weights), a bare preset name, a packaged model's
    name (:mod:`jaxmap.loading.packaged`), or the default."""
    if model is None:
        return open_source(default_model_path())
    text = str(model)
    if text.startswith("preset:"):
        return RandomSource(preset_config(text[len("preset:"):]), seed=seed)
    if not Path(text).exists() and text in list_presets():
        return RandomSource(preset_config(text), seed=seed)
    if not Path(text).exists() and text in PACKAGED:
        return open_source(packaged_model_path(text))
    return open_source(text)


def default_max_seq_len(config: ModelConfig) -> int:
    return min(config.max_position_embeddings, 4096)


def load(
    model: str | Path | None = None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    layer_mode: str = "auto",
    seed: int = 0,
    progress: bool = True,
    *,
    device_layers: str | int | Sequence[str] | None = None,
    topology: str | Path | dict | None = None,
    tp: int | None = None,
    pp: int | None = None,
    devices: str | Sequence[int] | None = None,
    plan: str | Path | DeviceMap | None = None,
    max_batch_size: int | None = None,
    save_plan: str | Path | None = None,
    max_memory: str | dict | None = None,
    auto: bool = True,
    allow_disk: bool = True,
    offload_folder: str | Path | None = None,
    isq: str | None = None,
    imatrix: str | Path | dict | None = None,
    prefill_chunk: int | None = None,
    override_tensor: str | list[str] | None = None,
    cpu_moe: bool = False,
    n_cpu_moe: int | None = None,
    ep: int | None = None,
) -> Model:
    """Load a model and map it onto the devices present.

    ``model``: a Hugging Face folder, a GGUF file, ``preset:NAME`` (random weights) or None (the default SmolLM2).
    Placement wishes, as on the command line: ``device_layers="0:16;1:14"`` (or ``["0:16", "1:14"]``),
    ``topology=`` a YAML path, text or dict, ``tp=``, ``pp=``, ``ep=`` (a mixture of experts' routed experts split
    over that many groups of a stage's devices), ``devices="0,2"``, or a saved ``plan=``.
    Memory: ``max_memory="0:20GiB,host:64GiB"`` (or a dict of sizes) caps what the plan may use; layers that do not
    fit the accelerators are streamed from host memory, then from disk (``offload_folder``, unless
    ``allow_disk=False``); ``auto=False`` keeps the layout even where it does not fit.
    ``isq=``: in-situ quantization type (``Q4K``, ``Q8_0``, ``INT8``...; see :mod:`jaxmap.materialize.isq`); ``"none"``
    dequantizes a GGUF, which otherwise (with no ``dtype`` either) keeps its stored quantized types.
    ``imatrix=``: an importance matrix (a file from ``python -m jaxmap.imatrix``, or a dict of vectors) that weights
    each quantized block's fit by how much activation its inputs carry (:mod:`jaxmap.imatrix`).
    ``prefill_chunk=``: prompt tokens per prefill step (default 2048): longer prompts are prefilled chunk by chunk,
    which bounds prefill memory (the plan reserves one chunk's activations) at the cost of more, smaller steps.
    """
    if layer_mode not in LAYER_MODES:
        raise UserError(f"layer_mode must be one of {', '.join(LAYER_MODES)}, got {layer_mode!r}")
    if plan is not None:
        _check_plan_alone(tp=tp, pp=pp, devices=devices, device_layers=device_layers, topology=topology,
                          max_memory=max_memory, isq=isq, dtype=dtype, auto=auto, allow_disk=allow_disk,
                          override_tensor=override_tensor, cpu_moe=cpu_moe or None, n_cpu_moe=n_cpu_moe, ep=ep)
    listen_to_jax()
    phases = Phases()
    importance = None if imatrix is None else Imatrix.load(imatrix)
    t_open = time.perf_counter()
    source = resolve_source(model, seed=seed)
    try:
        config = source.config
        check_complete = getattr(source, "check_complete", None)  # a file missing a needed tensor: refused now
        if check_complete is not None:
            check_complete()
        _warn_unused_layers(source, config)
        if importance is not None:
            importance.check_model(config)
        phases.add("open", time.perf_counter() - t_open)
        t_plan = time.perf_counter()
        saved = _read_plan(plan, config) if plan is not None else None
        if saved is not None:
            dtype = saved.dtype
            if layer_mode == "auto" and saved.layer_mode in LAYER_MODES:
                layer_mode = saved.layer_mode  # a plan from tune replays its layer mode too
            max_seq_len, max_batch_size = _plan_sizes(saved, max_seq_len, max_batch_size)
        max_batch_size = 1 if max_batch_size is None else _whole(max_batch_size, "max_batch_size")
        if prefill_chunk is not None:
            prefill_chunk = _whole(prefill_chunk, "prefill_chunk")
            if prefill_chunk < 1:
                raise UserError(f"--prefill-chunk must be at least 1, got {prefill_chunk}")
            if saved is not None and prefill_chunk > saved.chunk:
                log.warning("the saved plan budgeted prefill activations for chunks of %d tokens; --prefill-chunk %d "
                            "may not fit: make a new plan for it (--save-plan)", saved.chunk, prefill_chunk)
        seq = default_max_seq_len(config) if max_seq_len is None else _whole(max_seq_len, "max_seq_len")
        if seq < 1:
            raise UserError(f"--max-seq-len must be at least 1, got {seq}")
        if seq > config.max_position_embeddings:
            log.warning("--max-seq-len %d is longer than the model's context (%d positions): positions past it are "
                        "ones the model was not trained on", seq, config.max_position_embeddings)
        hardware = Hardware.from_jax()
        np_dtype = parse_dtype(dtype) if dtype else default_dtype(hardware.default_platform)
        global_isq = isq_mod.default_isq(source, isq, dtype)
        wish = make_wish(tp=tp, pp=pp, devices=devices, device_layers=device_layers, topology=topology,
                         isq=global_isq, max_memory=max_memory, auto=auto, allow_disk=allow_disk,
                         override_tensor=override_tensor, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ep=ep)
        if wish.topology is not None:
            isq_mod.check_types(None, [e.isq for e in [*wish.topology.ranges, *wish.topology.patterns]])
            if global_isq == isq_mod.NATIVE and any(e.isq for e in [*wish.topology.ranges, *wish.topology.patterns]):
                # The reference's rule: with a pre-quantized checkpoint only a topology's device part applies.
                log.warning("topology isq entries ignored: %s is already quantized, so only their devices apply "
                            "(pass --isq or --dtype to requantize or dequantize it)", source.path)
                wish = dataclasses.replace(wish, topology=wish.topology.with_isq(isq_mod.NATIVE))
        # A GGUF kept in its own types is planned with them (file sizes and types); a quantized jaxmap checkpoint is
        # planned at float size (conservative) and its stored types fill the plan's placeholders below.
        native = isq_mod.native_types(source)
        stored = isq_mod.native_bytes(source) if global_isq == isq_mod.NATIVE else None
        device_map = saved if saved is not None else plan_device_map(
            config, hardware, wish, jnp.dtype(np_dtype).name, seq, max_batch_size, stored,
            native_types=native if stored else None, prefill_chunk=prefill_chunk)
        ensure_types(device_map, config, native)  # a plan saved before it stored final types; native placeholders
        if save_plan is not None:
            _check_plan_path(Path(save_plan))  # written once the load succeeds: a failed run leaves no plan behind
        for warning in device_map.warnings:
            log.warning("%s", warning)
        log.info("device map for %s:\n%s", source.path, device_map.render_table())
        phases.add("plan", time.perf_counter() - t_plan)
        with phases.time("load"):
            stages = materialize_model(source, device_map, hardware, np_dtype, importance, offload_folder, progress)
        with phases.time("engine"):
            chunk = prefill_chunk if prefill_chunk is not None else device_map.chunk
            engine = Engine(config, stages, jnp.dtype(np_dtype), seq, layer_mode, chunk)
            tokenizer = source.tokenizer()
            return_freed_heap()  # the load's temporaries: freed, but still resident until handed back
        log.info("loaded %s: %d layers in %d stage(s), %s, max_seq_len %d", source.path, config.num_hidden_layers,
                 len(stages), jnp.dtype(np_dtype).name, seq)
        if save_plan is not None:
            if layer_mode != "auto":
                device_map.layer_mode = layer_mode  # replayed by --plan
            _write_text(Path(save_plan), device_map.to_yaml())
        out = Model(config, engine, tokenizer, str(source.path))
        out.device_map = device_map
        out.phases = phases
        phases.report("load")
        return out
    finally:
        source.close()


LAYER_MODES = ("auto", "unrolled", "per_layer", "scan")
_PLAN_FIXES = {"tp": "--tp", "pp": "--pp", "devices": "--devices", "device_layers": "-n", "topology": "--topology",
               "max_memory": "--max-memory", "isq": "--isq", "dtype": "--dtype", "override_tensor": "-ot",
               "cpu_moe": "--cpu-moe", "n_cpu_moe": "--n-cpu-moe", "ep": "--ep"}


def _check_plan_alone(auto: bool, allow_disk: bool, **wishes) -> None:
    """A saved plan fixes placement, dtype and ISQ types: a flag that would change them is refused, not dropped."""
    given = [_PLAN_FIXES[k] for k, v in wishes.items() if v is not None]
    given += [flag for flag, on in (("--no-auto", not auto), ("--no-disk", not allow_disk)) if on]
    if given:
        raise UserError(f"a saved plan (--plan) fixes the placement, dtype and ISQ types, so {', '.join(given)} "
                        f"would be ignored; drop {'it' if len(given) == 1 else 'them'}, or make a new plan with "
                        f"{'it' if len(given) == 1 else 'them'} (--save-plan)")


def _read_plan(plan, config: ModelConfig) -> DeviceMap:
    if isinstance(plan, DeviceMap):
        plan.check_model(config)
        return plan
    if not isinstance(plan, (str, Path)):
        raise UserError(f"plan= takes a path to a saved plan (.yaml) or a DeviceMap, got {type(plan).__name__}")
    path = Path(plan)
    if not path.is_file():
        raise UserError(f"cannot read plan {path}: no such file")
    return DeviceMap.from_yaml(path, config)


def _plan_sizes(saved: DeviceMap, max_seq_len, max_batch_size) -> tuple[int, int]:
    """The plan's KV sizes unless asked otherwise; larger ones than it budgeted for run, with a warning."""
    seq = saved.max_seq_len if max_seq_len is None else _whole(max_seq_len, "max_seq_len")
    batch = saved.max_batch_size if max_batch_size is None else _whole(max_batch_size, "max_batch_size")
    if seq > saved.max_seq_len or batch > saved.max_batch_size:
        log.warning("the saved plan budgeted memory for max_seq_len %d x max_batch_size %d; this run asks %d x %d, "
                    "which may not fit: make a new plan for it (--save-plan)", saved.max_seq_len,
                    saved.max_batch_size, seq, batch)
    return seq, batch


def _whole(value, name: str) -> int:
    if not isinstance(value, (numbers.Integral, np.integer)) or isinstance(value, bool):
        raise UserError(f"{name} (--{name.replace('_', '-')}) must be a whole number, got {value!r}")
    return int(value)


def _warn_unused_layers(source, config: ModelConfig) -> None:
    """A config that says fewer layers than the checkpoint holds runs a truncated model: legal, but say so."""
    names = source.names() if hasattr(source, "names") else []
    family = family_of(config)
    layers = {layer for n in names if (layer := family.layer_of(n)) is not None}
    extra = sorted(i for i in layers if i >= config.num_hidden_layers)
    if extra:
        log.warning("%s holds %d layers' tensors beyond the config's num_hidden_layers=%d (layers %d-%d): they are "
                    "not used", source.path, len(extra), config.num_hidden_layers, extra[0], extra[-1])


def _check_plan_path(path: Path) -> None:
    """Refuse a --save-plan path that cannot be written before any weight is read."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name such as {path / 'plan.yaml'}")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a half-written plan is never left behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
