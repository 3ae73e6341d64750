"""The SCL model. `build_model(config)` is the stable entry point."""
from pipeline.model.scl import SCLModel


def build_model(config) -> SCLModel:
    """The full model from a `pipeline.config.Config` (random init, or pretrained towers where named)."""
    return SCLModel(config)


__all__ = ["SCLModel", "build_model"]
