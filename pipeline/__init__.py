"""Pipeline: the command line, training of each stage, the cascade, sampling and evaluation."""
