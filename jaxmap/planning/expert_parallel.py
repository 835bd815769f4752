"""Expert parallelism (``ep``): how many ways a stage splits a mixture of experts' routed experts, decided as data.

vLLM's semantics (``--enable-expert-parallel``): a stage's devices run attention tensor parallel (``tp`` = all of
them) and, for the routed experts, the same devices are seen as ``ep x (tp / ep)``: the experts split ``ep`` ways
(each device group holds ``E / ep`` whole experts), and inside a group each expert's intermediate dimension splits
over the remaining ``tp / ep`` devices (tensor parallelism inside experts, today's only split when ``ep`` is 1). The
rules table maps the logical axis ``experts`` to the mesh axis ``ep`` and ``mlp`` to ``tp``; :func:`axis_sizes`
gives each tensor the sizes of the view it is held on. A device holds ``1 / tp`` of every expert stack either way;
what ep changes is which slice: whole experts, so a quantized expert's blocks are never cut (no ISQ fallback on a
split ``experts_down``), the expert width need not divide, and a token's contribution is computed where its experts
are (``jaxmap.engine.moe_parallel``).

Rules: an explicit ``--ep N`` the expert count does not divide, or that does not divide the device count of a stage
running MoE layers, or on a dense model, is refused in one line. The automatic choice, on every stage of ``tp > 1``
devices that runs MoE layers: the largest ``ep`` dividing both the stage's device count and the expert count (and
leaving an inner split the expert width divides); where none above 1 exists, tensor parallelism inside experts.
``--ep 1`` keeps that split. Pure data, no jax.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError

EXPERT_ROLE = "expert"


def axis_sizes(role: str | None, tp: int, ep: int = 1) -> dict[str, int]:
    """The mesh axis sizes a tensor of ``role`` sees on a stage of ``tp`` devices with ``ep``: routed expert stacks
    the expert view (``ep`` groups of ``tp / ep``), everything else (router included, replicated) plain ``tp``."""
    if role == EXPERT_ROLE and ep > 1:
        return {"tp": tp // ep, "ep": ep}
    return {"tp": tp, "ep": 1}


def is_moe(config: ModelConfig) -> bool:
    return bool(getattr(config, "num_experts", 0))


def _moe_in(config: ModelConfig, start: int, end: int) -> bool:
    return is_moe(config) and any(config.is_moe_layer(i) for i in range(start, end))


def valid_ep_sizes(config: ModelConfig, devices: int) -> list[int]:
    """The ``ep`` a stage of ``devices`` devices may take: dividing the devices and the experts, leaving an inner
    tensor-parallel split (``devices / ep``) the expert width divides."""
    if not is_moe(config):
        return [1]
    width = config.moe_intermediate_size
    return [e for e in range(1, devices + 1)
            if devices % e == 0 and config.num_experts % e == 0 and width % (devices // e) == 0]


def check_wish(config: ModelConfig, ep: int | None) -> None:
    """What ``--ep`` alone decides against the model (before any device is looked at)."""
    if ep is None or ep == 1:
        return
    name = config.name or "the model"
    if not is_moe(config):
        raise UserError(f"--ep {ep}: {name} is not a mixture of experts (no routed experts to split); drop --ep")
    if config.num_experts % ep:
        allowed = ", ".join(str(e) for e in range(1, config.num_experts + 1) if config.num_experts % e == 0)
        raise UserError(f"--ep {ep} does not divide the {config.num_experts} experts of {name}; ep in {{{allowed}}}")


def choose(config: ModelConfig, devices: int, asked: int | None, where: str) -> tuple[int, str | None]:
    """(ep, reason) for one stage of ``devices`` devices running MoE layers; ``where`` names the stage for a
    refusal. The reason is None where nothing is worth saying (one device, ep 1 asked)."""
    if asked is not None:
        check_wish(config, asked)
        if asked == 1:
            return 1, ("--ep 1: tensor parallel inside experts (each expert's intermediate size "
                       f"{config.moe_intermediate_size} over tp={devices})" if devices > 1 else None)
        if devices % asked:
            raise UserError(f"--ep {asked} does not fit the {devices} device(s) of {where}: ep must divide a stage's "
                            f"device count (the same devices run attention tensor parallel); ep in "
                            f"{{{', '.join(map(str, valid_ep_sizes(config, devices)))}}} there")
        if config.moe_intermediate_size % (devices // asked):
            raise UserError(f"--ep {asked} on the {devices} devices of {where} leaves tp={devices // asked} inside "
                            f"each expert, which the expert width {config.moe_intermediate_size} does not divide; "
                            f"ep in {{{', '.join(map(str, valid_ep_sizes(config, devices)))}}} there")
        return asked, f"expert parallel ep={asked} as asked (--ep {asked}): {_split(config, devices, asked)}"
    if devices == 1:
        return 1, None
    ep = max(valid_ep_sizes(config, devices))
    if ep == 1:
        return 1, (f"expert parallel unavailable: {config.num_experts} experts and {devices} devices share no "
                   f"factor; tensor parallel inside experts (intermediate size {config.moe_intermediate_size} over "
                   f"tp={devices})")
    return ep, f"expert parallel ep={ep} (the largest dividing {devices} devices and {config.num_experts} " \
               f"experts): {_split(config, devices, ep)}"


def _split(config: ModelConfig, devices: int, ep: int) -> str:
    inner = devices // ep
    out = f"{config.num_experts // ep} of {config.num_experts} experts per device group"
    out += f", each expert's intermediate size over tp={inner} inside a group" if inner > 1 else " (whole experts)"
    return out + f"; attention tensor parallel over all {devices}"


def apply(config: ModelConfig, stages: Sequence, asked: int | None) -> str | None:
    """Give every stage running MoE layers its ``ep`` (``Stage.mesh["ep"]``, absent at 1); returns the reason for
    the strategy line (None when no stage splits experts and nothing was asked). A dense model with ``--ep`` > 1,
    and an ``--ep`` that fits no stage, are refused."""
    check_wish(config, asked)
    reasons: list[str] = []
    for s in stages:
        s.mesh.pop("ep", None)
        if not _moe_in(config, s.start, s.end):
            continue
        where = f"layers {s.start}-{s.end - 1} ({', '.join(s.devices)})"
        ep, reason = choose(config, len(s.devices), asked, where)
        if ep > 1:
            s.mesh["ep"] = ep
        if reason is not None and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or None


def stage_ep(stage) -> int:
    """A DeviceMap stage's ``ep`` (1 where its mesh has none: dense stages, plans saved before ep existed)."""
    return int(stage.mesh.get("ep", 1))


def check_plan(config: ModelConfig, stages: Sequence) -> None:
    """A saved plan's ep against the model it is loaded for: a stage's ep must divide its devices and the experts."""
    for s in stages:
        ep = stage_ep(s)
        if ep == 1:
            continue
        if ep < 1 or ep not in valid_ep_sizes(config, len(s.devices)):
            raise UserError(f"the plan's stage {s.start}-{s.end} has ep={ep}, which does not fit its "
                            f"{len(s.devices)} device(s) and the {getattr(config, 'num_experts', 0)} experts of "
                            f"{config.name or 'the model'}; make a new plan")
