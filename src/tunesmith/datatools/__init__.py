"""The data-cleaning toolkit behind `tunesmith data`: prepare (filter, reshape, count, de-duplicate and
sample records in one streaming pass; blocks.py runs it on every core), stats (lengths, percentiles,
histograms), convert (between alpaca, sharegpt and openai; validate a dataset as training reads it) and
writer (atomic output in any record format).

It reads files through the training pipeline's `tunesmith.data.streams`, so both report the same file
and line for the same problem; it imports nothing from the model layer or above (token counts take a
tokenizer, or a function that loads one, from the caller). Nothing is imported here, so `tunesmith data`
starts without torch.
"""
