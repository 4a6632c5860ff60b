"""Many processes (jax.distributed, gloo collectives on CPU) against one.

Each run is a real `python -m jpost.main` (through `python -m jpost.launch`
for several processes) on the tiny checkpoints: 2 processes x 4 devices,
1 process x 8 devices and 1 process x 1 device must give the same per-step
losses and the same parameter updates; a killed run resumes exactly; a lost
process ends the run instead of hanging it.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from norms import assert_norm_close
from xla_env import xla_flags

CONFIGS = pathlib.Path(__file__).with_name('digit_share_config.py')
GRPO_CONFIG = f'{CONFIGS}:grpo'
# Measured between the three layouts (float32): per-step losses differ by at
# most 8e-6 relative (GRPO; SFT 3e-7), parameter updates by 8e-6 (GRPO; SFT
# 7e-7). Two processes reading rows one step out of order (packed, with drops)
# put SFT's third loss 6e-4 off.
LOSS_BOUND, UPDATE_BOUND = 1e-4, 1e-4
# Start-up and two steps take ~40 s on 2 cores, the heartbeat timeout is 10 s;
# the launcher would wait 120 s more before killing a process that hangs.
LOST_BOUND_S = 120


def _run(workdir, config, checkpoint, *extra, processes=1, devices=1, env=None, timeout=600):
  args = [f'--config={config}', f'--workdir={workdir}', f'--config.model.path={checkpoint}',
          *extra]
  if 'pairs' not in config and 'eval' not in config:  # training: steps under the guard
    args.append('--config.transfer_guard=disallow')
  env = {**os.environ, **(env or {})}
  if processes == 1:
    command = [sys.executable, '-m', 'jpost.main', *args]
    env['XLA_FLAGS'] = xla_flags(devices)
  else:
    command = [sys.executable, '-m', 'jpost.launch', f'--processes={processes}',
               f'--devices-per-process={devices}', '--timeout-s=120', '--', *args]
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _metrics(workdir, key='loss'):
  return [json.loads(line)[key] for line in (workdir / 'metrics.jsonl').read_text().splitlines()
          if key in line]


def _updates(workdir, start_dir):
  final = load_file(workdir / 'hf' / 'model.safetensors')
  start = load_file(start_dir / 'model.safetensors')
  return {k: final[k].astype(np.float64) - start[k] for k in sorted(start)}


def _assert_same_run(got, want, start_dir):
  losses_got, losses_want = _metrics(got), _metrics(want)
  assert len(losses_got) == len(losses_want) > 0
  for step, (a, b) in enumerate(zip(losses_got, losses_want), 1):
    assert abs(a - b) <= LOSS_BOUND * max(abs(b), 1e-3), (step, a, b)
  assert_norm_close(_updates(got, start_dir), _updates(want, start_dir), bound=UPDATE_BOUND)


SFT = ('configs/sft.py:tiny', '--config.batch_size=8', '--config.total_steps=3',
       # Each process packs, and drops (too long), only the rows it reads, so
       # only unpacked batches with nothing dropped are the same rows for any
       # number of processes: rows cut at 256 tokens, not dropped (a step at
       # 512 took twice as long, for the same check).
       '--config.data.packing=False', '--config.data.max_len=256',
       '--config.data.truncation=truncate_right', '--config.optim.lr=1e-3',
       '--config.checkpoint.every=3')  # one checkpoint, at the end


def test_sft_two_processes_equal_one(tiny_checkpoint, tmp_path):
  """(1 x 8 equals 1 x 1 for an SFT step in test_train.py, on the same mesh.)"""
  for name, (processes, devices) in {'2x4': (2, 4), '1x1': (1, 1)}.items():
    done = _run(tmp_path / name, SFT[0], tiny_checkpoint, *SFT[1:], processes=processes,
                devices=devices)
    assert done.returncode == 0, done.stderr[-3000:]
  _assert_same_run(tmp_path / '2x4', tmp_path / '1x1', tiny_checkpoint)


def test_grpo_two_processes_equal_one_and_resume_after_losing_one(char_checkpoint, tmp_path):
  # Process 1 dies (SIGKILL) right after checkpoint 2: process 0 must end by
  # itself once process 1's heartbeats stop, not hang in its next collective.
  tic = time.monotonic()
  lost = _run(tmp_path / 'lost', GRPO_CONFIG, char_checkpoint,
              '--config.distributed.heartbeat_timeout_s=10', processes=2, devices=4,
              env={'JPOST_FAULT_KILL_AT_STEP': '2', 'JPOST_FAULT_KILL_PROCESS': '1'})
  seconds = time.monotonic() - tic
  assert lost.returncode == 128 + 9, lost.stderr[-3000:]  # the first to fail: SIGKILL
  assert 'still running' not in lost.stderr  # process 0 ended by itself, not by the launcher
  assert 'another task died' in lost.stderr, lost.stderr[-3000:]  # JAX's words
  assert seconds < LOST_BOUND_S, seconds
  resumed = _run(tmp_path / 'lost', GRPO_CONFIG, char_checkpoint, processes=2,
                 devices=4)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 2' in resumed.stderr

  # Against one process on one device: the mesh, the processes and the
  # resume at once (a resumed process reading the wrong prompts would sample
  # other completions). test_online.py checks one process's resume is exact.
  one = _run(tmp_path / '1x1', GRPO_CONFIG, char_checkpoint, devices=1)
  assert one.returncode == 0, one.stderr[-3000:]
  # The rollouts are the same tokens, so the rewards are equal exactly.
  rewards = _metrics(tmp_path / '1x1', 'reward/total/mean')
  assert _metrics(tmp_path / 'lost', 'reward/total/mean') == rewards
  _assert_same_run(tmp_path / 'lost', tmp_path / '1x1', char_checkpoint)


def _lines(path):
  return sorted(path.read_text().splitlines())


def test_pairs_over_processes_then_dpo_on_them(char_checkpoint, tmp_path):
  """An inference recipe: each process samples and scores every other batch
  on its own device; process 0 writes what one process would have written
  (`eval` splits its batches the same way). Then a preference recipe on
  what it wrote."""
  for name, processes in (('one', 1), ('two', 2)):
    done = _run(tmp_path / name, f'{CONFIGS}:pairs', char_checkpoint, '--config.data.eval=()',
                processes=processes, devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
  for file in ('pairs_train.jsonl', 'best_of_n_train.jsonl'):
    assert _lines(tmp_path / 'two' / file) == _lines(tmp_path / 'one' / file)
  one, two = (json.loads((tmp_path / n / 'pairs_stats.json').read_text())['train']
              for n in ('one', 'two'))
  assert {k: v for k, v in two.items() if k not in ('seconds', 'path')} == {
      k: v for k, v in one.items() if k not in ('seconds', 'path')} and one['pairs'] >= 2

  # DPO on those pairs: its reference log-probs are cached before the first
  # step in a pass over every pair that spans the processes, batches of 3
  # pairs on 2 x 2 devices (each process's rows padded so that all of them
  # split over the mesh). Two processes must train as one does.
  train = tmp_path / 'two' / 'pairs_train.jsonl'
  dpo = ('configs/dpo.py:tiny', f'--config.data.train=("{train}",)', '--config.data.eval=()',
         '--config.dpo.kl_prompts=0', '--config.dpo.cache_batch_size=3',
         '--config.batch_size=4', '--config.optim.lr=1e-3', '--config.total_steps=3')
  for name, processes, devices in (('dpo_2x2', 2, 2), ('dpo_1x1', 1, 1)):
    done = _run(tmp_path / name, dpo[0], char_checkpoint, *dpo[1:], processes=processes,
                devices=devices)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'reference log-probs: computed' in done.stderr
  _assert_same_run(tmp_path / 'dpo_2x2', tmp_path / 'dpo_1x1', char_checkpoint)
