"""What the network and the hardware are: :class:`ModelConfig`, model presets (``models/``), hardware presets
(``meshes/``) and dtype names. Pure data: imports neither jax nor anything below it."""

from jaxmap.config.model import PRESETS_DIR, ModelConfig, config_fingerprint, list_presets

__all__ = ["PRESETS_DIR", "ModelConfig", "config_fingerprint", "list_presets"]
