"""Stages of the cascade (LightningModules) and the networks they share."""
from stages.metrics import bits_per_dim
from stages.stage import STAGES, DepthSPN, FirstSliceDecoder, SizeSPN, SubscaleStage

__all__ = ["STAGES", "DepthSPN", "FirstSliceDecoder", "SizeSPN", "SubscaleStage", "bits_per_dim"]
