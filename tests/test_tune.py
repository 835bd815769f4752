"""Groundwork for ``python -m jaxmap.tune``: a saved plan replays the layer mode it was made with, so the plan tune
saves reproduces its choice under ``generate --plan``."""

from pathlib import Path

from jaxmap.api import load

TINY_LLAMA = str(Path(__file__).parent / "data" / "tiny-llama")


def test_plan_replays_layer_mode(tmp_path):
    plan = tmp_path / "plan.yaml"
    made = load(TINY_LLAMA, progress=False, layer_mode="per_layer", save_plan=plan, max_seq_len=64)
    assert "layer_mode: per_layer" in plan.read_text()
    replayed = load(TINY_LLAMA, progress=False, plan=plan)
    assert [s.mode for s in replayed.engine.stages] == ["per_layer"] * len(replayed.engine.stages)
    ids = [[1, 2, 3]]
    assert (replayed.generate(ids, max_new_tokens=4)[0].token_ids
            == made.generate(ids, max_new_tokens=4)[0].token_ids)
