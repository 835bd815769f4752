"""Routed experts apart from their layer at run time (issue 17, engine/remote_experts.py), on virtual CPU devices:
the layers run on cpu[1], the experts are computed on another CPU device (``--cpu-moe``, ``--n-cpu-moe``, ``-ot
REGEX=cpu[N]``), streamed from host memory (``-ot REGEX=host``: the routed experts' slices at decode) or read from
the folder's safetensors (``-ot REGEX=disk``); each gives transformers' logits and greedy tokens
(tests/reference/make_tiny_moe.py). Quantized experts stay quantized on the CPU device; bfloat16 stays bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
from reference.moe_data import load_moe_reference

import jaxmap
from jaxmap.engine import remote_experts
from jaxmap.planning.experts import moved_bytes
from jaxmap.quant.qtensor import QTensor

KW = dict(dtype="float32", max_seq_len=64, progress=False, devices="1", max_memory="host:1GiB")

CASES = {  # name: (reference, flags, {layer: (kind, holding device)})
    "cpu-moe": ("tiny-mixtral-swa", dict(cpu_moe=True), {0: ("cpu", "cpu:0"), 1: ("cpu", "cpu:0")}),
    "n-cpu-moe-1": ("tiny-qwen3-moe", dict(n_cpu_moe=1), {0: ("cpu", "cpu:0")}),
    "ot-cpu3": ("tiny-qwen3-moe", dict(override_tensor=r"blk\.2\.ffn_.*_exps=cpu[3]"), {2: ("cpu", "cpu:3")}),
    "host": ("tiny-mixtral-swa", dict(override_tensor="exps=host"), {0: ("host", "cpu:0"), 1: ("host", "cpu:0")}),
    "disk": ("tiny-qwen3-moe", dict(override_tensor=r"layers\.[02]\.mlp\.experts=disk"),
             {0: ("disk", None), 2: ("disk", None)}),
    "tp2-cpu-moe": ("tiny-qwen3-moe", dict(cpu_moe=True, tp=2, devices="2,3"), {0: ("cpu", "cpu:0"),
                                                                                 2: ("cpu", "cpu:0")}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name, flags, want = CASES[request.param]
    ref = load_moe_reference(name)
    return request.param, ref, jaxmap.load(str(ref["folder"]), **{**KW, **flags}), want


def _apart(model) -> dict:
    return {i: a for st in model.engine.stages for i, a in st.apart.items()}


def test_experts_apart_match_transformers(case):
    label, ref, model, want = case
    apart = _apart(model)
    assert {i: a.kind for i, a in apart.items()} == {i: k for i, (k, _) in want.items()}
    for i, a in apart.items():  # the stacks really live on the device holding them, not in the layer's params
        _, holder = want[i]
        if holder is None:
            assert a.stacks is None and a.read is not None
        else:
            assert {str(d) for w in a.stacks.values() for d in jax_devices(w)} == {holder}
    layer_devices = {str(d) for st in model.engine.stages for p in st.params["layers"] for w in p.values()
                     for d in jax_devices(w)}
    assert layer_devices == ({"cpu:2", "cpu:3"} if label.startswith("tp2") else {"cpu:1"}), label
    for logits, expected in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=0, err_msg=label)
    got = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in got] == ref["greedy"], label
    single = model.generate(ref["input_ids"][:1], max_new_tokens=4, stop_at_eos=False)[0].token_ids
    assert single == ref["greedy"][0][:4]  # batch 1: decode takes the routed slices, not the stack


def jax_devices(w) -> set:
    import jax

    return {d for leaf in jax.tree.leaves(w) for d in leaf.devices()}


def test_streamed_decode_moves_only_the_routed_experts():
    """Batch-1 decode of host experts moves k of E experts' slices, as the plan's moved_bytes says."""
    ref = load_moe_reference("tiny-qwen3-moe")
    model = jaxmap.load(str(ref["folder"]), **KW, override_tensor=r"blk\.0\.=host")
    config, a = model.config, _apart(model)[0]
    stack = sum(int(leaf.nbytes) for w in a.stacks.values() for leaf in __import__("jax").tree.leaves(w))
    assert remote_experts.how(a, 1, config) == "slices" and remote_experts.how(a, 16, config) == "stack"
    plan_decode = moved_bytes(config, "stream", 1, stack, "float32")
    assert plan_decode == stack * config.num_experts_per_tok // config.num_experts
    assert remote_experts.moved_bytes(a, 1, config, 4) == plan_decode
    assert moved_bytes(config, "stream", 16, stack, "float32") == stack
    assert moved_bytes(config, "cpu", 1, stack, "float32") == 2 * config.hidden_size * 4


def test_quantized_experts_stay_quantized_on_the_cpu():
    """--isq Q8_0 with --cpu-moe: the stacks on cpu[0] are Q8_0 QTensors; logits and greedy tokens equal the
    Q8_0 model with everything on one device."""
    ref = load_moe_reference("tiny-mixtral-swa")
    model = jaxmap.load(str(ref["folder"]), **KW, isq="Q8_0", cpu_moe=True)
    one = jaxmap.load(str(ref["folder"]), **KW, isq="Q8_0")
    for a in _apart(model).values():
        assert all(isinstance(w, QTensor) and w.qtype == "Q8_0" for w in a.stacks.values())
        assert {str(d) for w in a.stacks.values() for d in jax_devices(w)} == {"cpu:0"}
    for x, y in zip(model.forward_logits(ref["input_ids"]), one.forward_logits(ref["input_ids"]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
    got = [r.token_ids for r in model.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]
    assert got == [r.token_ids for r in one.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]


def test_bfloat16_experts_keep_their_type_on_the_cpu():
    ref = load_moe_reference("tiny-qwen3-moe")
    model = jaxmap.load(str(ref["folder"]), **{**KW, "dtype": "bfloat16"}, cpu_moe=True)
    stacks = [w for a in _apart(model).values() for w in a.stacks.values()]
    assert stacks and {str(w.dtype) for w in stacks} == {"bfloat16"}


def test_disk_experts_of_a_quantized_gguf_stay_quantized(tmp_path):
    """A Q8_0 GGUF's experts on disk: written once to the offload folder in their Q8_0 blocks, the routed ones read
    back per step; the same logits and greedy tokens as the file with everything on one device."""
    import gguf
    from reference.moe_data import write_moe_gguf

    ref = load_moe_reference("tiny-mixtral-swa")
    path = write_moe_gguf(ref["name"], tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    kw = {k: v for k, v in KW.items() if k != "dtype"}
    model = jaxmap.load(str(path), **kw, override_tensor=r"blk\.1\.ffn_.*_exps=disk",
                        offload_folder=str(tmp_path / "offload"))
    one = jaxmap.load(str(path), **kw)
    files = list((tmp_path / "offload").rglob("experts-0001.safetensors"))
    assert len(files) == 1 and _apart(model)[1].kind == "disk"
    read = _apart(model)[1].read([2, 0])
    assert all(isinstance(w, QTensor) and w.qtype == "Q8_0" for w in read.values())
    for x, y in zip(model.forward_logits(ref["input_ids"]), one.forward_logits(ref["input_ids"]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
    got = [r.token_ids for r in model.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]
    assert got == [r.token_ids for r in one.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]


def test_fit_uses_every_kind_that_runs():
    """On an accelerator the fit computes host-memory experts on the CPU for decode (streamed for prefill) and,
    when host memory is full, reads the earlier layers' experts from disk: every layer stays resident."""
    from jaxmap.config.hardware import Hardware
    from jaxmap.families import preset_config
    from jaxmap.planning.experts import RUNNABLE_KINDS
    from jaxmap.planning.planner import plan
    from jaxmap.planning.wishes import make_wish

    assert set(RUNNABLE_KINDS) == {"cpu", "host", "disk"}
    m = plan(preset_config("qwen3-30b-a3b"), Hardware.from_preset("1x24gb"),
             make_wish(max_memory={"host": 20 << 30}), dtype="bf16")
    kinds = {(e.memory_kind, e.decode, e.prefill) for e in m.experts}
    assert kinds == {("cpu", "cpu", "stream"), ("disk", "stream", "stream")}
    on_disk = [e.layer for e in m.experts if e.memory_kind == "disk"]
    in_host = [e.layer for e in m.experts if e.memory_kind == "cpu"]
    assert max(on_disk) < min(in_host) and all(s.memory_kind == "device" for s in m.stages)
