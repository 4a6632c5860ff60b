"""Data layer: user rows -> validated canonical rows -> tokens, masks, batches.

`sources` reads rows (JSONL, Parquet, Python lists) tagged with where they came
from, `rows` validates and normalises them under an error-or-skip policy, and
the Grain pipelines turn canonical rows into batches of `tokens`, `positions`,
`segment_ids` and `loss_mask`.
"""
