"""Stages of the cascade (LightningModules) and the networks they share."""
from stages.metrics import bits_per_dim
from stages.stage import GEOMETRY, STAGES, DepthSPN, FirstSliceDecoder, SizeSPN, SubscaleStage, geometry

__all__ = ["GEOMETRY", "STAGES", "DepthSPN", "FirstSliceDecoder", "SizeSPN", "SubscaleStage", "bits_per_dim", "geometry"]
