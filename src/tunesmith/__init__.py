"""tunesmith: fine-tune and align language models from one YAML file."""

import os

# oneDNN (float32 matmuls on CPUs where it beats MKL, see algorithms/linear.py; bf16 ones everywhere) keeps
# compiled kernels per matmul shape in two caches of 1024 entries each, about 0.75 MB per shape. A run
# meets a new shape with each packed batch's length, so resident memory would grow by hundreds of MB.
# 128 entries hold a training step's or a decode batch's shapes. Read once, at oneDNN's first matmul:
# set here, before torch runs one; the environment's own values win.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "128")

__version__ = "0.1.0"
