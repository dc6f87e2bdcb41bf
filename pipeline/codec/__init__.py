"""The codec: the file format and the range coder driven by a trained cascade (coder.py), the compress
and decompress commands (compress.py) and the sizes of ordinary codecs to compare with (reference.py)."""
