"""Supervised fine-tuning of SmolLM2-135M-Instruct on GSM8K worked answers.

  python -m jpost.main --config=configs/sft.py --workdir=runs/sft
  python -m jpost.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny
  python -m jpost.main --config=configs/sft.py --workdir=runs/mine \\
      --config.model.path=/my/hf/checkpoint --config.data.train='("my.jsonl",)'

Data sources are JSONL/Parquet paths or built-in names ('gsm8k:sft_train');
several train sources mix with `data.weights`.
"""

import ml_collections

from jpost.models import lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'sft'
  c.seed = 0
  # One process per host, jax.distributed (README, "Many processes and hosts").
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, heartbeat_timeout_s=100, init_timeout_s=300))
  # 'disallow' turns any implicit host<->device transfer in a step into an error.
  c.transfer_guard = 'allow'
  # dtype 'auto': bfloat16 compute where matmuls have 16-bit hardware, else
  # float32 (models/config.py, resolve_dtype).
  c.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='auto', param_dtype='float32', remat='dots',
      # README, "Attention and memory": implementation, key block, LM-head chunk.
      attention='auto', attention_block=512, attention_max_segments=16, logits_chunk=32))
  # LoRA/QLoRA (README, "LoRA and QLoRA"): rank 0 is full fine-tuning.
  c.lora = lora.default_config()
  # pack_window: examples packed together, best-fit-decreasing; padding_free:
  # a device's rows of a micro-batch packed as one row ('auto': where
  # attention runs on the fused CPU kernel) (README, "Data").
  c.data = ml_collections.ConfigDict(dict(
      train=('gsm8k:sft_train',), eval=('gsm8k:sft_test',), weights=(),
      max_len=256, mask_mode='auto', truncation='truncate_left', packing=True,
      pack_window=128, padding_free='auto', policy='error', num_threads=0))
  c.batch_size = 4
  c.accum_steps = 1
  c.total_steps = 24
  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=5e-5, warmup_steps=2, schedule='cosine', end_lr_ratio=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  c.loss = ml_collections.ConfigDict(dict(normalization='token'))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=12, keep=2, async_save=True,
                                                compression='auto'))
  c.log_every = 1
  c.eval_every = 12
  c.tensorboard = False
  c.export_hf = True
  if arg == 'tiny':
    c.model.dtype = 'float32'  # exact-resume tests compare float32 runs
    c.model.remat = 'none'
    c.data.max_len = 128
    c.batch_size = 2
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.checkpoint.every = 2
    c.eval_every = 0
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
