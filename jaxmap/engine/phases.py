"""Where a start's time goes: wall time per phase (open, plan, load, prefill, decode) plus jax's own
trace / lower / compile durations, in one DEBUG line (the CLI's ``-v``) so a slow start can be read, not guessed."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("jaxmap")

#: jax's compile-path events, accumulated for the whole process (their names are jax's, see jax/_src/dispatch.py)
JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "compile"}
_jax_totals: dict[str, float] = {name: 0.0 for name in JAX_EVENTS.values()}
_listening = False


def listen_to_jax() -> None:
    """Register (once) a listener summing jax's trace, lowering and backend-compile durations."""
    global _listening
    if _listening:
        return
    import jax.monitoring

    def on_event(event: str, duration: float, **_kw) -> None:
        name = JAX_EVENTS.get(event)
        if name is not None:
            _jax_totals[name] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    _listening = True


def jax_totals() -> dict[str, float]:
    """Seconds jax has spent tracing, lowering and compiling in this process so far."""
    return dict(_jax_totals)


class Phases:
    """Ordered phase -> seconds; ``with phases.time("load"):`` adds to a phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def render(self) -> str:
        return ", ".join(f"{name} {s:.2f} s" for name, s in self.seconds.items())

    def report(self, what: str) -> None:
        log.debug("%s phases: %s", what, self.render())
