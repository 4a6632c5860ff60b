"""A process reward model (PRM) on step-labelled solutions (SmolLM2-135M trunk).

  python -m jpost.main --config=configs/prm.py --workdir=runs/prm
  python -m jpost.main --config=configs/prm.py:tiny --workdir=runs/prm_tiny \\
      --config.model.path=DIR --config.data.train='("steps.jsonl",)' \\
      --config.data.eval='("steps.jsonl",)'

`data.train` / `data.eval` are step files (JSONL/Parquet rows with 'prompt',
'steps' and 'labels': one label in [0, 1] per step, 1 = correct). The steps
are joined by `data.separator` as the assistant turn and the model is read at
the last token of each step. One epoch by default (`total_steps=0` means
`epochs` over the train rows). The model is exported to `workdir/hf` as a
transformers sequence classifier; `jpost.models.reward.load_step_scorer`
gives per-step probabilities with it. Step accuracy, step AUC and
first-error detection on `data.eval` go to `workdir/prm_eval.json`.
"""

import ml_collections

from jpost.models import lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'prm'
  c.seed = 0
  # One process per host, jax.distributed (README, "Many processes and hosts").
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, heartbeat_timeout_s=100, init_timeout_s=300))
  # 'disallow' turns any implicit host<->device transfer in a step into an error.
  c.transfer_guard = 'allow'
  c.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='auto', param_dtype='float32', remat='dots',
      # README, "Attention and memory": implementation, key block, LM-head chunk.
      attention='auto', attention_block=512, attention_max_segments=16, logits_chunk=512))
  # LoRA/QLoRA (README, "LoRA and QLoRA"): rank 0 is full fine-tuning.
  c.lora = lora.default_config()
  # Rows longer than max_len keep the steps that end inside it (counted as
  # data/truncated and data/steps_cut); a row with none is dropped (too_long).
  c.data = ml_collections.ConfigDict(dict(
      train=('runs/prm_labels/steps_train.jsonl',), eval=('runs/prm_labels/steps_test.jsonl',),
      weights=(), max_len=256, separator='\n', policy='skip', num_threads=0))
  c.batch_size = 8
  c.eval_batch_size = 8  # the last batch is filled up with empty rows, which weigh nothing
  c.score_batch_size = 16  # rows per forward of the end-of-run step metrics
  c.accum_steps = 1
  c.epochs = 1.0
  c.total_steps = 0  # 0: derived from `epochs`
  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=2e-5, warmup_steps=2, schedule='cosine', end_lr_ratio=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
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
    c.batch_size = 8
    c.eval_batch_size = 8
    c.score_batch_size = 8
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.checkpoint.every = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
