"""jpost.memory's predictions: each part by hand for a small config, and the
whole against XLA's buffer assignment for real shapes (bench/plan.py, compiled
on abstract arrays: nothing is allocated)."""

import json
import pathlib
import subprocess
import sys

import pytest

from jpost import memory
from jpost.models.config import ModelConfig
import xla_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(**changes):
  fields = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                num_kv_heads=2, dtype='bfloat16', remat='full', attention='auto',
                attention_block=8, logits_chunk=4)
  return ModelConfig(**fields | changes)


def test_sft_parts_by_hand():
  cfg = _config()  # head_size 4: q, k, v are 16 + 8 + 8 = 32 wide
  layer = 2 * 8 * (2 * (6 * 16 + 2 * 32 + 3 * 32) + 4 * 2 * 16)  # 2 rows x 8 tokens
  parts = memory.step_activations(cfg, rows=2, seq_len=8)
  assert parts == {
      'saved_activations': 2 * 8 * 2 * 16 * 3,  # each layer's bfloat16 input
      'layer_backward': 2 * layer,
      # 'auto' on CPU is blockwise, even for 8 keys in one block: 2 float32 [T, block]
      'attention': 2 * 4 * 8 * 8 * 4 * 2,
      'lm_head': 2 * 4 * 100 * 4}  # a chunk of 4 positions of float32 logits
  # 16 tokens: blockwise over 8-key blocks, queries in blocks of 8 too, 2
  # [block, block] tiles' worth alive.
  assert memory.step_activations(cfg, rows=1, seq_len=16)['attention'] == 4 * 8 * 8 * 4 * 2
  # 'xla' (what 'auto' picks for one block on a GPU): 3 float32 [T, T].
  xla = memory.step_activations(_config(attention='xla'), rows=2, seq_len=8)
  assert xla['attention'] == 2 * 4 * 8 * 8 * 4 * 3
  # Padding-free SFT rows: the LM head still takes rows of max_len (8 here),
  # so 4 rows' chunks of 4 positions at a time for one row of 32.
  assert memory.step_activations(cfg, rows=1, seq_len=32, head_len=8)['lm_head'] == (
      4 * 4 * 100 * 4)
  # No remat: every layer's activations and materialised scores are kept.
  none = memory.step_activations(_config(remat='none', attention='xla'), rows=2, seq_len=8)
  assert none['saved_activations'] == 3 * layer and none['attention'] == 3 * xla['attention']
  # 'dots' keeps the layer input, the q/k/v/o/gate/up outputs and the
  # rotated queries and keys (6 heads x 4), and the blockwise attention's
  # float32 output and log-sum-exp (4 heads x (4 + 1) per token); 'xla' has
  # none to keep. One key block of at least HALVED_MIN_LEN keys runs in
  # halves, which keep the output in the compute dtype (4 heads x (2 x 4 + 4)).
  kept = 16 + 32 + 16 + 2 * 32 + 6 * 4
  dots = memory.step_activations(_config(remat='dots'), rows=2, seq_len=8)
  assert dots['saved_activations'] == 2 * 8 * (2 * kept + 4 * 4 * 5) * 3
  dots_xla = memory.step_activations(_config(remat='dots', attention='xla'), rows=2, seq_len=8)
  assert dots_xla['saved_activations'] == 2 * 8 * 2 * kept * 3
  halved = memory.step_activations(_config(remat='dots', attention_block=128), rows=1,
                                   seq_len=128)
  assert halved['saved_activations'] == 128 * (2 * kept + 4 * (2 * 4 + 4)) * 3
  # Fused kernels keep no scores; cuDNN's backward workspace grows with the
  # span slots of its packed layout (attention_max_segments + 2 padding runs).
  assert memory.step_activations(_config(attention='pallas'), rows=2, seq_len=8)['attention'] == 0
  # So does the CPU kernel, which under 'dots' keeps its output in the
  # compute dtype and its log-sum-exp, as the halved path does.
  cpu = memory.step_activations(_config(attention='cpu', remat='dots'), rows=2, seq_len=8)
  assert cpu['attention'] == 0
  assert cpu['saved_activations'] == 2 * 8 * (2 * kept + 4 * (2 * 4 + 4)) * 3
  for segments in (4, 14):
    cudnn = memory.step_activations(_config(attention='cudnn', attention_max_segments=segments),
                                    rows=2, seq_len=8)
    assert cudnn['attention'] == 2 * (segments + 2) * 8 * 4 * 4 * 8
  # A scalar head (reward models, PRMs) in place of the LM head.
  assert memory.step_activations(cfg, rows=2, seq_len=8, lm_head=False) == parts | {'lm_head': 0}
  state = memory.with_state(cfg, parts)
  p = cfg.num_params()
  assert state['params'] == 4 * p and state['optimizer'] == 8 * p
  assert state['weight_casts'] == 2 * p
  assert state['total'] == pytest.approx(sum(v for k, v in state.items() if k != 'total'))


def test_rl_update_parts_by_hand():
  """2 prompts of 4 tokens, 3 samples each of 6 new tokens: the prompts go
  through once, the completions attend to 10 keys (blockwise: 'auto' on CPU,
  in blocks of 8), and only completion positions reach the LM head."""
  cfg = _config()
  parts = memory.rl_update_activations(cfg, prompts=2, samples=3, prompt_len=4, new_tokens=6)
  tokens = 2 * 4 + 6 * 6
  assert parts['saved_activations'] == tokens * 2 * 16 * 3
  assert parts['attention'] == 2 * 4 * 4 * 4 * 4 * 2 + 6 * 4 * 6 * 8 * 4 * 2
  assert parts['lm_head'] == 6 * 4 * 100 * 4


def _plan(*args):
  out = subprocess.run([sys.executable, 'bench/plan.py', '--layers', '4', '--compile', *args],
                       cwd=ROOT, env=xla_env.env(1), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('args', [['--batch', '2', '--seq-len', '1024'],
                                  ['--batch', '2', '--seq-len', '1024', '--remat', 'dots'],
                                  ['--grpo', '2,8,128,512']], ids=['sft', 'sft-dots', 'grpo'])
def test_prediction_is_within_15_percent_of_xla(args):
  """SmolLM2's shape cut to 4 layers, bfloat16, remat full (plan.py's
  default) and 'dots' (most recipes'): the formula against XLA's assignment
  of the compiled step. (For 'dots' the ratio was 0.89 before remat.saved
  kept the saved values as bits on CPU, 0.94 after.)"""
  plan = _plan(*args)
  assert 0.85 <= plan['predicted_over_compiled'] <= 1.15, plan


def test_shortfall_compares_with_the_free_memory_a_device_reports():
  gb = 2**30
  stats = {'bytes_limit': 80 * gb, 'bytes_in_use': 30 * gb}  # a GPU's memory_stats(), in part
  assert memory.shortfall(60 * gb, stats) == (50 * gb, 80 * gb)
  assert memory.shortfall(50 * gb, stats) is None  # exactly what is free
  assert memory.shortfall(60 * gb, {'bytes_limit': 80 * gb}) is None  # nothing in use yet
  assert memory.shortfall(1e15, None) is None  # XLA:CPU reports no stats
  from jpost.trainers import loop
  warning = loop.memory_warning('policy update', 52 * gb, 8 * gb, stats)
  assert warning.startswith('jpost: warning: the policy update needs about 60.00 GB per device '
                            '(activations 52.00, gradients 8.00; predicted) beside the state, '
                            'and the device has 50.00 of its 80.00 GB free')
  assert loop.memory_warning('step', 42 * gb, 8 * gb, stats) is None


def test_the_plan_warns_only_where_a_device_reports_its_memory(tiny_checkpoint, capsys):
  """On CPU (no memory stats) the plan's line comes without a warning, even
  for more memory than any machine has (bench/gpu.sh checks the warning on
  a card)."""
  import jax

  from jpost.models import hf
  from jpost.trainers import loop
  assert jax.local_devices()[0].memory_stats() is None
  params = jax.tree.leaves(hf.load(tiny_checkpoint))
  parts = {'saved_activations': 2**50, 'layer_backward': 0, 'attention': 0, 'lm_head': 0}
  loop.print_activations(parts, 'step', params)
  err = capsys.readouterr().err
  assert 'step activations up to' in err and 'warning' not in err
