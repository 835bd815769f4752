"""Device mapping for any JAX model: shard a pytree, plan its memory, offload parts of it to host memory.

The engine's machinery made reusable for code that is not a llama, on the model's own rules machinery
(:mod:`jaxmap.planning.rules` turns a logical-axis table into specs and checks hand-written ones) and device budgets
(:mod:`jaxmap.planning.fit`, :mod:`jaxmap.config.hardware`):

- :func:`shard` places a pytree of arrays on a mesh, by regex rules over '/'-joined pytree paths or by a logical
  axis table (logical name -> mesh axis) applied to a parallel tree of logical-axis tuples (or to flax ``nnx.Param``
  ``sharding`` metadata); :func:`shardings_for` gives the same placement as ``NamedSharding``s, also for abstract
  trees (``jax.eval_shape`` / ``nnx.eval_shape``). (:mod:`.sharding`)
- :func:`plan_for` decides, for a pytree of shapes, which subtrees go on which device: consecutive runs on the
  devices in order, host memory for what fits on none; it returns bytes per device and the assignment, as data.
  (:mod:`.memory_plan`)
- :func:`offload` / :func:`fetch` move subtrees between device memory and host memory (``pinned_host``) with the
  sharding kept, and :func:`fetch` works inside ``jit`` (XLA copies the bytes back to the device when needed).
  (:mod:`.offload`)

Every function names leaves by the same paths (:mod:`.paths`): an nnx Module or State is seen as its variables'
values (``lin/kernel``, never ``lin/kernel/value``), so a regex written for :func:`shard` selects the same leaves in
:func:`offload`, :func:`fetch`, :func:`plan_for` and :func:`memory_kinds`.
"""

from __future__ import annotations

from jaxmap.library.memory_plan import MemoryPlan, plan_for
from jaxmap.library.offload import Select, fetch, memory_kinds, offload
from jaxmap.library.paths import path_str
from jaxmap.library.sharding import Rules, shard, shardings_for, spec_from_logical

__all__ = ["MemoryPlan", "Rules", "Select", "fetch", "memory_kinds", "offload", "path_str", "plan_for", "shard",
           "shardings_for", "spec_from_logical"]
