"""Data pipeline: dataset_info.json registry -> records -> conversations -> token ids with loss masks -> packed rows.

readers.py (files -> records), registry.py (names -> files + format), formats.py (alpaca/sharegpt ->
conversations), templates.py (conversations -> per-turn token ids), encode.py (labels, truncation),
packing.py (rows and batches), dataset.py (the entry points training calls), streams.py
(record-by-record reading with located errors, shared with the cleaning toolkit in datatools/).
Nothing is imported here, so `tunesmith data` starts without torch.
"""
