"""The command line: config files, overrides, the recipe registry, the demo job."""

import json
import subprocess
import sys

import pytest

from jpost import trainers


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'jpost.main', *args],
                        capture_output=True, text=True, timeout=timeout)


def test_unknown_recipe_lists_known_ones(tmp_path):
  proc = _run('--config=configs/generate.py:tiny', '--config.trainer=nope',
              f'--workdir={tmp_path}')
  assert proc.returncode != 0
  assert "config.trainer='nope' is not a known recipe" in proc.stderr
  assert 'generate' in proc.stderr


def test_registry_rejects_unknown_names():
  with pytest.raises(ValueError, match=r"known recipes: \[.*'generate'"):
    trainers.get('ppo2')


def test_generate_tiny_with_overrides(tmp_path):
  proc = _run('--config=configs/generate.py:tiny', f'--workdir={tmp_path}',
              '--config.sampling.max_new_tokens=10')
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / 'generations.jsonl').open()]
  assert [r['prompt'] for r in records] == ['What is the capital of France?', 'What is 12 * 7?']
  assert 'Paris' in records[0]['answer']
  assert all(0 < r['tokens'] <= 10 for r in records)  # the override took effect
  assert 'Paris' in proc.stdout


def test_bad_config_argument_is_an_error(tmp_path):
  proc = _run('--config=configs/generate.py:huge', f'--workdir={tmp_path}')
  assert proc.returncode != 0 and "unknown config argument 'huge'" in proc.stderr


def test_chat_interactive_two_turns_streams_answers():
  proc = subprocess.run(
      [sys.executable, '-m', 'jpost.main', '--config=configs/chat.py:greedy',
       '--config.sampling.max_new_tokens=30'],
      input='What is the capital of France?\nAnd of Italy?\n/exit\n',
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = [line for line in proc.stdout.splitlines() if line.startswith('assistant> ')]
  assert len(answers) == 2
  assert 'Paris' in answers[0] and 'Rome' in answers[1]  # the second turn saw the first


def test_chat_one_shot():
  proc = _run('--config=configs/chat.py:greedy', '--config.prompt=What is the capital of France?',
              '--config.sampling.max_new_tokens=20')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Paris' in proc.stdout


@pytest.mark.parametrize('user_dir', [None, 'mine'])
def test_compiled_programs_are_kept_in_the_jpost_cache(tmp_path, monkeypatch, user_dir):
  import jax
  from jpost import main
  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
  monkeypatch.setenv('JPOST_CACHE', str(tmp_path))
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
