"""Mixture-of-experts MLP: a router picks ``k`` of ``E`` SwiGLU experts per token, and the token's output is the
routed experts' outputs weighted by their router probabilities.

Experts arrive stacked (``experts_gate`` / ``experts_up``: ``[E, D, I]``, ``experts_down``: ``[E, I, D]``). Two ways
to compute, chosen per shape at trace time (both exact; the shapes are static under jit):

- **gather** (decode, few tokens): take the routed experts' weight slices (``w[idx]``, ``[N, k, D, I]``) and
  multiply each token by its own k experts. Only the routed experts' weights are read, so memory traffic per token
  follows the active parameters, not the total.
- **grouped** (prefill, many tokens): sort the N*k (token, expert) pairs by expert and run one
  ``jax.lax.ragged_dot`` per projection over the contiguous groups: every expert's weights are read once and each
  token's FLOPs are its k experts'.

A third way, the dense all-experts product (every token through every expert, weights zero for the unrouted), was
measured against these on CPU (``tests/test_moe.py::test_moe_paths_agree`` checks all three agree; the figures
are in the README's MoE section) and won every prefill shape there, so it runs for prompts while its intermediate
is small (``_DENSE_MAX_ELEMENTS``); ragged_dot is unmeasured on accelerators.

Quantized experts (ISQ, or a GGUF's own blocks): a stack is one QTensor per expert stacked along a leading axis of
every leaf (:func:`jaxmap.quant.stack`, each expert ``[out, in]``). Decode gathers the routed experts' blocks
(``leaf[idx]``) and runs the quantized product on each (:func:`_qproject`), so it still reads the active experts'
bytes only, at their quantized size; prefill dequantizes the whole stack once per layer (:func:`_float_stack`).
The router, a plain 2-D projection, goes through :func:`jaxmap.quant.dense`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmap.config import ModelConfig
from jaxmap.engine import moe_parallel
from jaxmap.engine.moe_activation import BIAS_KEYS, down_bias, expert_activation, router_logits, swiglu
from jaxmap.families import LayerDesign
from jaxmap.quant import dense
from jaxmap.quant.kernels import dequantize, qdot
from jaxmap.quant.qtensor import QTensor

# Gather while tokens x k <= E (decode, short prompts): the gathered slices then cost no more bytes than the stack.
# Past that, the dense all-experts product was faster than ragged_dot on every CPU shape measured (README, MoE
# section: N=256 E=64 k=8: dense 380 ms, grouped 2458 ms), so it runs while its [N, E, I] intermediate stays under
# _DENSE_MAX_ELEMENTS; larger prompts take the grouped path, whose memory follows N x k.
_DENSE_MAX_ELEMENTS = 1 << 26


def route(logits: jnp.ndarray, k: int, renormalize: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(weights [N, k] float32, expert ids [N, k]): softmax over all experts, top-k, renormalised to sum to 1 when
    asked (Mixtral always; Qwen3-MoE with ``norm_topk_prob``)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, idx


def _qproject(xs: jnp.ndarray, w: QTensor, idx: jnp.ndarray) -> jnp.ndarray:
    """``xs [N, k, in]``, each (token, expert) pair through its own expert of a quantized stack: ``[N, k, out]``.
    Only the routed experts' blocks are gathered (``leaf[idx]``), and each pair runs the quantized matrix-vector
    product of :func:`jaxmap.quant.kernels.qdot` (vmapped), which dequantizes inside the product rather than
    materialising the experts as float (measured faster than dequantize-then-multiply, README)."""
    picked = jax.tree.map(lambda a: a[idx].reshape(-1, *a.shape[1:]), w)
    flat = xs.reshape(-1, xs.shape[-1])
    y = jax.vmap(lambda v, q: qdot(v[None], q)[0])(flat, picked)
    return y.reshape(*idx.shape, -1)


def _float_stack(w, dtype):
    """A whole stack as float ``[E, in, out]`` (prefill's dense and grouped paths)."""
    if not isinstance(w, QTensor):
        return w
    return jnp.swapaxes(jax.vmap(lambda q: dequantize(q, dtype))(w), 1, 2)


def _gather(x, weights, idx, wg, wu, wd, act=swiglu):
    """x [N, D]; per token its k experts' slices (of a quantized stack: :func:`_qproject`)."""
    if isinstance(wg, QTensor):
        xk = jnp.broadcast_to(x[:, None], (x.shape[0], idx.shape[1], x.shape[1]))
        h = act(_qproject(xk, wg, idx), _qproject(xk, wu, idx), idx)
        out = _qproject(h, wd, idx)
    else:
        g = jnp.einsum("nd,nkdi->nki", x, wg[idx])
        u = jnp.einsum("nd,nkdi->nki", x, wu[idx])
        out = jnp.einsum("nki,nkid->nkd", act(g, u, idx), wd[idx])
    return jnp.einsum("nkd,nk->nd", out.astype(jnp.float32), weights)


def _grouped(x, weights, idx, wg, wu, wd, act=swiglu):
    """Sort (token, expert) pairs by expert and run each projection as one ragged_dot over the groups."""
    n, k = idx.shape
    e = wg.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tokens = order // k
    xs = x[tokens]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    g = jax.lax.ragged_dot(xs, wg, sizes)
    u = jax.lax.ragged_dot(xs, wu, sizes)
    out = jax.lax.ragged_dot(act(g, u, flat[order]), wd, sizes)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[tokens].add(out)


def _dense(x, weights, idx, wg, wu, wd, act=swiglu):
    """Every token through every expert; unrouted experts weighted zero."""
    e = wg.shape[0]
    full = jnp.zeros((x.shape[0], e), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
    g = jnp.einsum("nd,edi->nei", x, wg)
    u = jnp.einsum("nd,edi->nei", x, wu)
    out = jnp.einsum("nei,eid->ned", act(g, u, jnp.arange(e)[None, :]), wd)
    return jnp.einsum("ned,ne->nd", out.astype(jnp.float32), full)


PATHS = {"gather": _gather, "grouped": _grouped, "dense": _dense}


def choose_path(n_tokens: int, config: ModelConfig) -> str:
    k, e = config.num_experts_per_tok, config.num_experts
    if n_tokens * k <= e:
        return "gather"
    return "dense" if n_tokens * e * config.moe_intermediate_size <= _DENSE_MAX_ELEMENTS else "grouped"


def moe_mlp(p: dict, h: jnp.ndarray, config: ModelConfig, taps: dict, path: str | None = None,
            design: LayerDesign | None = None) -> jnp.ndarray:
    """The MoE MLP over h [B, T, D] (already normed); ``path`` forces one computation (tests, benchmarks);
    ``design`` says what the experts do besides SwiGLU (biases, gpt-oss's clamped activation:
    :mod:`jaxmap.engine.moe_activation`)."""
    b, t, d = h.shape
    x = h.reshape(b * t, d)
    logits = router_logits(p, dense(x, p["router"]))
    weights, idx = route(logits, config.num_experts_per_tok, config.norm_topk_prob)
    taps["router_idx"] = idx
    fn = PATHS[path or choose_path(b * t, config)]
    wg, wu, wd = (p[k] for k in ("experts_gate", "experts_up", "experts_down"))
    biases = {k: p[k] for k in BIAS_KEYS if k in p}
    ep_mesh = moe_parallel.expert_mesh_of(wg)
    if ep_mesh is not None:  # experts split over devices: each computes its own, one all-reduce (moe_parallel.py)
        out = moe_parallel.moe_mlp_ep(ep_mesh, x, weights, idx, dict(experts_gate=wg, experts_up=wu, experts_down=wd),
                                      config, path, paths=PATHS, float_stack=_float_stack,
                                      dense_max=_DENSE_MAX_ELEMENTS, biases=biases, design=design)
        return out.astype(h.dtype).reshape(b, t, d)
    if fn is not _gather:
        wg, wu, wd = (_float_stack(w, x.dtype) for w in (wg, wu, wd))
    out = fn(x, weights, idx, wg, wu, wd, expert_activation(design, biases))
    extra = down_bias(biases, weights, idx)
    if extra is not None:
        out = out + extra
    return out.astype(h.dtype).reshape(b, t, d)
