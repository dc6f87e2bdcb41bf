"""Inference on a trained cascade: exact likelihoods and sampling (cascade.py), the sample, upscale and
deepen commands (sample.py), make evaluate (evaluate.py), FID/KID (quality.py, features.py), pictures,
the split of the work between forked CPU processes (processes.py) and what two samplers are held to
(agreement.py)."""
