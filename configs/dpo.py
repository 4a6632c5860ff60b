"""DPO (or IPO, conservative DPO, SimPO) on verifier-ranked pairs, SmolLM2-135M.

  python -m jpost.main --config=configs/pairs.py --workdir=runs/pairs    # pairs first
  python -m jpost.main --config=configs/dpo.py --workdir=runs/dpo
  python -m jpost.main --config=configs/dpo.py --workdir=runs/simpo --config.dpo.loss_type=simpo
  python -m jpost.main --config=configs/dpo.py:tiny --workdir=runs/dpo_tiny

`dpo.reference='cache'` computes the frozen reference's log-probs once
(workdir/reference_logps.npz); 'on_the_fly' runs it every batch.
"""

import ml_collections

from jpost.models import lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'dpo'
  c.seed = 0
  # One process per host, jax.distributed (README, "Many processes and hosts").
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, heartbeat_timeout_s=100, init_timeout_s=300))
  # 'disallow' turns any implicit host<->device transfer in a step into an error.
  c.transfer_guard = 'allow'
  c.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='auto', param_dtype='float32', remat='dots',
      # README, "Attention and memory": implementation, key block, LM-head chunk
      # (16: pieces of 16 rows x 16 response tokens; 8 and 32 measured the same).
      attention='auto', attention_block=512, attention_max_segments=16, logits_chunk=16))
  # LoRA/QLoRA (README, "LoRA and QLoRA"): rank 0 is full fine-tuning.
  c.lora = lora.default_config()
  c.data = ml_collections.ConfigDict(dict(
      train=('runs/pairs/pairs_train.jsonl',), eval=('runs/pairs/pairs_test.jsonl',),
      weights=(), max_len=128, truncation='truncate_left', policy='skip', num_threads=0))
  c.batch_size = 8
  c.eval_batch_size = 8  # the last batch is filled up with empty pairs, which weigh nothing
  c.accum_steps = 1
  c.epochs = 2.0
  c.total_steps = 0  # 0: derived from `epochs`
  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=2e-5, warmup_steps=2, schedule='cosine', end_lr_ratio=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  c.dpo = ml_collections.ConfigDict(dict(
      loss_type='sigmoid', beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
      reference='cache', cache_batch_size=8,
      kl_prompts=16, kl_max_new_tokens=64))  # after training: KL on sampled held-out answers
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=1, async_save=True,
                                                compression='auto'))
  c.log_every = 1
  c.eval_every = 1000  # and at the start and the end
  c.tensorboard = False
  c.export_hf = True
  if arg == 'tiny':
    c.model.dtype = 'float32'
    c.model.remat = 'none'
    c.data.max_len = 96
    c.batch_size = 2
    c.eval_batch_size = 2
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.checkpoint.every = 2
    c.dpo.cache_batch_size = 2
    c.dpo.kl_prompts = 2
    c.dpo.kl_max_new_tokens = 8
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
