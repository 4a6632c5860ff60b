"""Run metrics: JSONL always, TensorBoard when enabled, a console line, MFU."""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


class MetricsWriter:
  """Appends {'step': s, **metrics} lines to workdir/metrics.jsonl."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = False,
               resume_step: int = 0):
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._drop_after(resume_step)
    self._tb = None
    if tensorboard and jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

  def _drop_after(self, step: int) -> None:
    """On resume, forget lines a killed run logged after its last checkpoint,
    so the file reads as one uninterrupted run. Only process 0 owns the file:
    another process rewriting it too could read it while process 0 has it
    truncated and write back nothing. The new file replaces the old at once."""
    if jax.process_index() != 0 or not self.path.exists():
      return
    kept, torn = [], 0
    for line in filter(str.strip, self.path.read_text().splitlines()):
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):  # half a line: killed while writing it
        torn += 1
    if torn:
      print(f'{self.path}: dropped {torn} unreadable line(s), left by a run killed while '
            'writing them', file=sys.stderr)
    partial = self.path.with_name(self.path.name + '.partial')
    partial.write_text(''.join(line + '\n' for line in kept))
    os.replace(partial, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if jax.process_index() != 0:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN; keep it visible as text
  return value


CONSOLE_KEYS = ('loss', 'eval_loss', 'eval_accuracy', 'reward/total/mean', 'kl',
                'completion/length', 'eval/reward', 'lr', 'grad_norm', 'tokens_per_s',
                'time/step_s', 'mfu')


def console_line(step: int, total: int, metrics: dict) -> None:
  parts = [f'step {step}/{total}']
  for key in CONSOLE_KEYS:
    if key in metrics:
      value = float(metrics[key])
      name = key.replace('/mean', '').replace('completion/', '').replace('time/', '')
      parts.append(f'{name} {value:.3g}' if key != 'mfu' else f'mfu {100 * value:.2f}%')
  print(' | '.join(parts), file=sys.stderr, flush=True)


def flops_per_token(cfg, seq_len: float) -> float:
  """Training FLOPs per token: 6 x matmul parameters + attention scores
  (12 x layers x heads x head_dim x context), as in the PaLM appendix, with
  `seq_len` the context (a batch's `attended_length`). With LoRA the frozen
  base needs no weight gradients (4 x its parameters) and the adapters cost
  6 x theirs."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  # The weights a token's forward multiplies by: every layer's projections
  # and the LM head (the embedding lookup is none; norms are elementwise).
  matmul_params = cfg.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * f) + cfg.vocab_size * d
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
  if cfg.lora is not None:
    from jpost.models import lora
    return 4 * matmul_params + 6 * lora.num_params(cfg) + attention
  return 6 * matmul_params + attention


def attended_length(*segment_ids) -> float:
  """The context PaLM's attention term counts for a batch: each real token's
  sequence length (its segment's, in packed rows; padding is none), averaged
  over the real tokens: sum(L^2) / sum(L). Rows of one unpadded sequence
  give their length, as before packing; rows packed with short samples give
  their samples', which is all a token attends to, not the row's."""
  squares = total = 0
  for seg in segment_ids:
    seg = np.asarray(seg, np.int64).reshape(-1, np.shape(seg)[-1])
    real = seg != 0
    if not real.any():
      continue
    # One bin per (row, segment id): a count in linear time, every step.
    low, span = seg.min(), seg.max() - seg.min() + 1
    bins = np.arange(len(seg))[:, None] * span + (seg - low)
    lengths = np.bincount(bins[real])
    squares += int(np.sum(lengths ** 2))
    total += int(np.sum(lengths))
  return squares / total if total else 0.0


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = 'float32') -> float:
  """FLOP/s of a large matmul on all local devices: the denominator of MFU.

  Measured rather than looked up, so the figure means the same on a laptop,
  a 2-core CI box and an H100 (where it sits below the datasheet peak).
  """
  n = 2048 if jax.default_backend() == 'cpu' else 8192
  a = jnp.ones((n, n), dtype)
  # Accumulated in float32, as the model's matmuls are (`decoder.dense`): on
  # CPU a bfloat16 result is a far slower path, which would inflate MFU.
  matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  matmul(a).block_until_ready()
  # The fastest call of a quarter second's worth (at least 5): a peak, and
  # robust to a data-loader thread or another process briefly taking a core
  # (a mean of 3 once read 143 GFLOP/s where the matmul runs at 275, putting
  # bf16 SFT MFU at 94%; on the AMX Xeon the fastest of 5 bfloat16 calls,
  # 60 ms, read 1090-1648 GFLOP/s in 12 probes, of a quarter second 1563-1703).
  seconds, calls, began = float('inf'), 0, time.perf_counter()
  while calls < 5 or (time.perf_counter() - began < 0.25 and calls < 200):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    seconds = min(seconds, time.perf_counter() - start)
    calls += 1
  devices = 1 if jax.default_backend() == 'cpu' else jax.local_device_count()
  return 2 * n ** 3 / seconds * devices
