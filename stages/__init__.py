"""Stages of the cascade (LightningModules), the networks they share, and the cascade's order
(`stages.plan`). The names below load on first use, so that `stages.plan` imports without torch."""
import importlib

_HOME = {"bits_per_dim": "stages.metrics", **{name: "stages.stage" for name in (
    "GEOMETRY", "STAGES", "DepthSPN", "FirstSliceDecoder", "SizeSPN", "SubscaleStage", "geometry")}}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")
