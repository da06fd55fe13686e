"""tunesmith: fine-tune and align language models from one YAML file."""

import os

# oneDNN (float32 matmuls on CPUs where it beats MKL, see algorithms/linear.py; bf16 ones everywhere) keeps
# compiled kernels per matmul shape in two caches of 1024 entries each, and a run meets a new shape with
# each packed batch's length. 40M-model SFT peaked at 2.11 GB with 1024 entries, 1.83 GB with 64, 1.75
# GB with 16, at the same speed: an fp32 kernel is rebuilt in about 0.2 ms. 64 also holds a bf16 decode
# batch's shapes, whose kernels cost about 0.4 ms to rebuild. Read once, at oneDNN's first matmul: set
# here, before torch runs one; the environment's own values win.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "64")
del _cache

__version__ = "0.1.0"
