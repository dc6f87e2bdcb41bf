"""Data: sources, the bit-depth and subscale transforms, and the shared DataModule."""
from data.datamodule import SubscaleDataModule
from data.transforms import from_slices, merge_depth, quantize, split_depth, to_slices

__all__ = ["SubscaleDataModule", "from_slices", "merge_depth", "quantize", "split_depth", "to_slices"]
