"""Plan a model for hardware you do not have, then run it here on the layout of your choice.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/layouts.py

Planning is pure data (no weights, no devices); running places the real SmolLM2 weights on virtual CPU devices.
"""

from __future__ import annotations

import jaxmap
from jaxmap.config.hardware import Hardware
from jaxmap.families import preset_config
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import make_wish


def main() -> None:
    # Llama-3-70B in bfloat16 on four 80 GB A100s: what goes where, and why.
    device_map = plan(preset_config("llama-3-70b"), Hardware.from_preset("4xa100-80gb"), make_wish(),
                      dtype="bfloat16", max_seq_len=8192)
    print(device_map.render_table(), "\n")

    # SmolLM2 on the devices present, split by hand: 16 layers on device 0, 14 on device 1.
    model = jaxmap.load(device_layers="0:16;1:14", max_seq_len=256, progress=False)
    print(model.device_map.render_table())
    print(model.generate("The capital of France is", max_new_tokens=16)[0].text)


if __name__ == "__main__":
    main()
