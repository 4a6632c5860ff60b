"""The command line: config files, overrides, the recipe registry, the demo job."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from digit_share_config import recipe
from jpost import trainers
from xla_env import xla_flags


def _run(*args, timeout=600, devices=None):
  env = dict(os.environ)
  if devices:
    env['XLA_FLAGS'] = xla_flags(devices)
  return subprocess.run([sys.executable, '-m', 'jpost.main', *args],
                        capture_output=True, text=True, timeout=timeout, env=env)


def test_registry_rejects_unknown_names():
  with pytest.raises(ValueError, match=r"known recipes: \[.*'generate'"):
    trainers.get('ppo2')


def test_generate_tiny_with_overrides(tmp_path):
  proc = _run('--config=configs/generate.py:tiny', f'--workdir={tmp_path}',
              '--config.sampling.max_new_tokens=10', '--config.sampling.scan_layers=true')
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / 'generations.jsonl').open()]
  assert [r['prompt'] for r in records] == ['What is the capital of France?', 'What is 12 * 7?']
  assert 'Paris' in records[0]['answer']
  assert all(0 < r['tokens'] <= 10 for r in records)  # the override took effect
  assert 'Paris' in proc.stdout


def _bad_rows(folder):
  path = folder / 'bad.jsonl'
  path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                  '{"messages": [{"role": "user"}]}\n')
  return path


# Each user mistake on the command line, and the line that tells the user what to fix.
USER_ERRORS = {
    'unknown recipe': (['--config=configs/generate.py:tiny', '--config.trainer=nope'],
                       "config.trainer='nope' is not a known recipe; known recipes: ["),
    'config file missing': (['--config=configs/nope.py'],
                            '--config=configs/nope.py: no such config file'),
    'config file missing, with an override': (
        ['--config=configs/nope.py', '--config.distributed.enabled=True'],
        '--config=configs/nope.py: no such config file'),
    'config argument': (['--config=configs/generate.py:huge'],
                        "--config=configs/generate.py:huge: unknown config argument 'huge'"),
    'config field unknown': (['--config=configs/sft.py:tiny', '--config.optim.learning_rate=1'],
                             "--config.optim.learning_rate=1: the config has no field "
                             "'learning_rate'"),
    'config field type': (['--config=configs/sft.py:tiny', '--config.total_steps=ten'],
                          "--config.total_steps=ten: invalid literal for int()"),
    'config field value': (['--config=configs/sft.py:tiny', '--config.total_steps=0'],
                           'config.total_steps=0: must be positive.'),
    'model missing': (['--config=configs/sft.py:tiny', '--config.model.path={tmp}/no_model'],
                      "model '{tmp}/no_model' is neither an existing HF checkpoint directory"),
    'checkpoint without weights': (
        ['--config=configs/sft.py:tiny', '--config.model.path={tmp}/partial'],
        'no *.safetensors in {tmp}/partial'),
    'bad data row': (['--config=configs/sft.py:tiny', '--config.model.path={tiny}',
                      "--config.data.train=('{tmp}/bad.jsonl',)"],
                     "{tmp}/bad.jsonl:2: messages[0] has no 'content'"),
}


@pytest.mark.parametrize('case', list(USER_ERRORS))
def test_user_errors_are_one_line_with_status_2(case, tmp_path, tiny_checkpoint):
  _bad_rows(tmp_path)
  shutil.copytree(tiny_checkpoint, tmp_path / 'partial', ignore=shutil.ignore_patterns('*.safetensors'))
  args, message = USER_ERRORS[case]
  fill = lambda text: text.format(tmp=tmp_path, tiny=tiny_checkpoint)
  proc = _run(*map(fill, args), f'--workdir={tmp_path}/run', devices=1)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('jpost: error: ')]
  assert len(errors) == 1 and fill(message) in errors[0], proc.stderr[-3000:]


def test_traceback_on_request_and_for_bugs(tmp_path, monkeypatch):
  args = '--config=configs/sft.py:tiny', '--config.total_steps=0', f'--workdir={tmp_path}'
  monkeypatch.setenv('JPOST_TRACEBACK', '1')
  shown = _run(*args)
  assert shown.returncode != 0 and 'Traceback' in shown.stderr
  assert 'jpost.errors.ConfigError: config.total_steps=0: must be positive.' in shown.stderr
  monkeypatch.delenv('JPOST_TRACEBACK')
  verbose = _run(*args, '--verbosity=1')
  assert verbose.returncode != 0 and 'Traceback' in verbose.stderr
  # A bug is not the user's mistake: its traceback shows without asking.
  bug = subprocess.run(
      [sys.executable, '-c', 'import sys; from jpost import main, trainers; '
       'trainers._RECIPES["boom"] = lambda config, workdir: 1 / 0; '
       'sys.argv[1:] = ["--config=configs/generate.py:tiny", "--config.trainer=boom"]; '
       'main.app.run(main.main, flags_parser=main._parse_flags)'],
      capture_output=True, text=True, timeout=300)
  assert bug.returncode == 1 and 'ZeroDivisionError' in bug.stderr and 'Traceback' in bug.stderr


def test_chat_interactive_two_turns_streams_answers():
  proc = subprocess.run(
      [sys.executable, '-m', 'jpost.main', '--config=configs/chat.py:greedy',
       '--config.sampling.max_new_tokens=30'],
      input='What is the capital of France?\nAnd of Italy?\n/exit\n',
      capture_output=True, text=True, timeout=600, env={**os.environ, 'XLA_FLAGS': xla_flags(1)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = [line for line in proc.stdout.splitlines() if line.startswith('assistant> ')]
  assert len(answers) == 2
  assert 'Paris' in answers[0] and 'Rome' in answers[1]  # the second turn saw the first


def test_a_conversation_past_the_context_drops_its_oldest_turns():
  """An interactive chat once ended (and lost the conversation) when it
  outgrew the context; now its oldest turns leave, the system prompt stays."""
  from jpost.models import pretrained
  from jpost.tokenizer import Tokenizer
  from jpost.trainers.chat import fit_context
  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  system = [{'role': 'system', 'content': 'Be brief.'}]
  turns = [{'role': role, 'content': f'{role} {i}: ' + 'word ' * 40}
           for i in range(6) for role in ('user', 'assistant')][:-1]  # ends on a user turn
  length = lambda m: len(tokenizer.encode_chat(m, add_generation_prompt=True).ids)
  room = -(-length(system + turns[-3:]) // 64) * 64  # the last exchange and question fit
  kept, dropped = fit_context(tokenizer, system + turns, kept=1, room=room)
  assert kept[0] == system[0] and kept[1]['role'] == 'user' and kept[-1] == turns[-1]
  assert dropped == len(turns) - (len(kept) - 1) and -(-length(kept) // 64) * 64 <= room
  assert fit_context(tokenizer, system + turns, kept=1, room=10 ** 6) == (system + turns, 0)
  assert fit_context(tokenizer, system + turns, kept=1, room=8) == (system, len(turns))


def test_chat_one_shot():
  proc = _run('--config=configs/chat.py:greedy', '--config.prompt=What is the capital of France?',
              '--config.sampling.max_new_tokens=30', devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Paris' in proc.stdout


@pytest.mark.parametrize('user_dir', [None, 'mine'])
def test_compiled_programs_are_kept_in_the_jpost_cache(tmp_path, monkeypatch, user_dir):
  import jax
  from jpost import main
  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
  monkeypatch.setenv('JPOST_CACHE', str(tmp_path))
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  if user_dir:  # JAX reads this itself; jpost leaves it alone
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', user_dir)
    jax.config.update('jax_compilation_cache_dir', user_dir)
  else:
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  try:
    main._keep_compiled_programs()
    expected = user_dir or str(tmp_path / 'xla')
    assert jax.config.jax_compilation_cache_dir == expected
    assert jax.config.jax_compilation_cache_max_size == 2 << 30
  finally:
    jax.config.update('jax_compilation_cache_dir', saved[0])
    jax.config.update('jax_compilation_cache_max_size', saved[1])


def test_no_compilation_cache_with_several_cpu_devices(monkeypatch):
  """Programs with collectives over device sub-groups deadlock when XLA:CPU
  loads them from the persistent cache (main.compilation_cache_is_safe)."""
  import jax
  from jpost import main
  saved = jax.config.jax_enable_compilation_cache
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_thunk_runtime=true '
                     '--xla_force_host_platform_device_count=8')
  try:
    main._keep_compiled_programs()
    assert jax.config.jax_enable_compilation_cache is False
  finally:
    jax.config.update('jax_enable_compilation_cache', saved)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  assert main.compilation_cache_is_safe()


# Recipes that compute in float32 on purpose; every other recipe with a model
# computes in 'auto' (bfloat16 where the CPU has bfloat16 matmuls), the fast
# setting each was measured in (bench/RESULTS.md).
_FLOAT32_BY_DESIGN = {
    'eval': 'the reference that judges and leaderboards compare against',
    'generate': "greedy output equal to transformers' token for token",
    'chat': "greedy output equal to transformers' token for token",
}


def _recipe_configs():
  configs = {}
  for path in sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.py')):
    module = recipe(path.stem)
    config = module.get_config()
    # serve names several models, curate a tokenizer only: no compute dtype.
    if 'dtype' in config.get('model', {}):
      configs[path.stem] = module
  return configs


_RECIPES = _recipe_configs()


_TRAINING = {'sft', 'reward', 'dpo', 'grpo', 'ppo', 'prm'}  # the rest sample or serve


def test_every_recipe_with_a_model_is_checked_below():
  assert _TRAINING | {'pairs', 'prm_labels'} | set(_FLOAT32_BY_DESIGN) == set(_RECIPES)


@pytest.mark.parametrize('name', sorted(set(_RECIPES) - set(_FLOAT32_BY_DESIGN)))
def test_recipes_compute_fast_by_default_and_tiny_in_float32(name):
  config = _RECIPES[name].get_config()
  assert config.model.dtype == 'auto', (
      f'configs/{name}.py computes in {config.model.dtype}: use "auto", measured as in '
      'bench/RESULTS.md, or list it in _FLOAT32_BY_DESIGN with the reason')
  if name in _TRAINING:
    assert config.model.remat in ('full', 'dots'), config.model.remat
  # Tests compare tiny runs exactly (resume) and bound log-probs tightly.
  assert _RECIPES[name].get_config('tiny').model.dtype == 'float32'


@pytest.mark.parametrize('name', sorted(_FLOAT32_BY_DESIGN))
def test_reference_recipes_stay_float32(name):
  assert _RECIPES[name].get_config().model.dtype == 'float32', _FLOAT32_BY_DESIGN[name]
