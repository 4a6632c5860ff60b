"""The Arena in real headless Chromium (selenium): ask, both answers stream,
vote, identities revealed, the vote in SQLite; model text containing
<script> and HTML shows as text; the leaderboard shows ratings. Votes are
exported and train a reward model with configs/reward.py unchanged."""

import concurrent.futures
import json
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import write_char_tokenizer
from jpost.eval import leaderboard
from jpost.serve import api, engine, recipe, votes
from jpost.serve import arena as arena_lib
import xla_env

# Whole tokens of markup: a model that says them tries to inject HTML.
MARKUP = ['<script>window.__xss = 1;</script>', '<img src=x onerror="window.__xss=2">',
          '<b>bold</b>', '&amp;', '<i>', '</div>']


def _markup_model(path, seed):
  """A random 2-layer Llama over characters plus whole markup tokens, whose
  markup rows are scaled up so that its answers are full of them."""
  from flax import nnx

  from jpost.models import hf
  from jpost.models.config import ModelConfig
  from jpost.models.decoder import Decoder
  from jpost.tokenizer import Tokenizer

  vocab_size = write_char_tokenizer(path, MARKUP)
  tokenizer = Tokenizer.from_dir(path)
  cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, num_kv_heads=1, tie_embeddings=True,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  model.embed[...] = model.embed[...].at[vocab_size - len(MARKUP):].multiply(30.0)
  hf.save(model, path, tokenizer=tokenizer)
  return path


@pytest.fixture(scope='module')
def arena(tmp_path_factory):
  folder = tmp_path_factory.mktemp('arena')
  paths = {name: str(_markup_model(folder / name, seed)) for name, seed in
           (('alpha', 1), ('beta', 2))}
  served = recipe.load_models(paths, dtype='float32',
                              engine_config=engine.EngineConfig(slots=4, cache_len=128))
  for model in served.values():
    model.engine.start()
  db = folder / 'arena.sqlite'
  background = recipe.Background(recipe.build_app(
      served, api.ServerConfig(), arena_db=db,
      arena_config=arena_lib.ArenaConfig(
          max_tokens=8, temperature=0.0, bootstrap_rounds=20)))
  yield background.url, db, served
  background.stop()
  for model in served.values():
    model.engine.stop()


def _browser():
  """Headless Chromium through chromedriver (Debian: chromium, chromium-driver)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  binary, driver = shutil.which('chromium'), shutil.which('chromedriver')
  if not (binary and driver):
    pytest.fail('the Arena browser test needs Chromium and its driver: '
                'apt-get install -y chromium chromium-driver (.ci/run installs them)')
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
               '--window-size=1200,800'):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(driver), options=options)


def _wait(browser, condition, seconds=60):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(browser, seconds, poll_frequency=0.05).until(condition)


def test_ask_stream_vote_reveal_and_leaderboard_in_chromium(arena, tmp_path):
  from selenium.webdriver.common.by import By

  url, db, served = arena
  browser = _browser()
  try:
    browser.get(url + '/arena')
    browser.find_element(By.ID, 'prompt').send_keys('Say something nice.')
    browser.find_element(By.ID, 'ask').click()
    _wait(browser, lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-state')
          in ('answered', 'error'))
    assert browser.find_element(By.ID, 'status').text == 'Which answer is better?'
    answers = [browser.execute_script(f'return document.getElementById("answer-{s}").textContent')
               for s in 'ab']
    # The models' markup is on the page as text: no element was made from it,
    # no script of theirs ran.
    assert any('<script>' in a for a in answers) and all(answers), answers
    assert browser.execute_script(
        'return document.querySelectorAll(".answer *").length') == 0
    assert browser.execute_script('return window.__xss === undefined')
    assert browser.find_element(By.ID, 'name-a').text == ''  # blind until the vote
    browser.save_screenshot(str(tmp_path / 'arena-answered.png'))

    browser.find_element(By.CSS_SELECTOR, '[data-vote="model_a"]').click()
    _wait(browser, lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-state')
          == 'voted')
    names = [browser.find_element(By.ID, f'name-{s}').text.strip('()') for s in 'ab']
    assert sorted(names) == ['alpha', 'beta']
    browser.save_screenshot(str(tmp_path / 'arena-voted.png'))
    with sqlite3.connect(db) as connection:
      rows = connection.execute('SELECT prompt, model_a, model_b, answer_a, answer_b, vote, '
                                'session, time FROM votes').fetchall()
    assert len(rows) == 1
    prompt, model_a, model_b, answer_a, answer_b, vote, session, when = rows[0]
    assert (prompt, [model_a, model_b], [answer_a, answer_b], vote) == (
        'Say something nice.', names, answers, 'model_a')
    assert session and abs(when - time.time()) < 300

    browser.get(url + '/arena/leaderboard')
    table = browser.find_element(By.ID, 'ratings')
    assert {cell.text for cell in table.find_elements(By.CLASS_NAME, 'model')} == {'alpha', 'beta'}
    assert browser.find_element(By.ID, 'matrix')
    browser.save_screenshot(str(tmp_path / 'leaderboard.png'))
  finally:
    browser.quit()
  assert (tmp_path / 'arena-answered.png').stat().st_size > 0


def _battle(url, prompt, vote):
  """One battle over HTTP as the page runs it: open, stream both sides, vote."""
  def post(path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method='POST',
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=60) as response:
      return json.loads(response.read())
  battle = post('/arena/battles', {'prompt': prompt, 'session': 'test'})['battle']
  for side in 'ab':
    with urllib.request.urlopen(f'{url}/arena/battles/{battle}/{side}', timeout=60) as response:
      assert b'"done": true' in response.read()
  return post(f'/arena/battles/{battle}/vote', {'vote': vote, 'session': 'test'})


def test_votes_export_to_preferences_and_battles_that_train_a_reward_model(
    arena, tiny_checkpoint, tmp_path):
  url, db, _ = arena
  cycle = ['model_a', 'model_b', 'model_a', 'tie', 'model_b', 'both_bad', 'model_a', 'model_b']
  with concurrent.futures.ThreadPoolExecutor(4) as pool:  # concurrent writers
    results = list(pool.map(lambda i: _battle(url, f'Question {i}?', cycle[i % len(cycle)]),
                            range(16)))
  assert all(r['vote'] in votes.VOTES for r in results)
  prefs, battles_file = tmp_path / 'prefs.jsonl', tmp_path / 'battles.jsonl'
  proc = subprocess.run([sys.executable, '-m', 'jpost.serve.export', f'--db={db}',
                         f'--preferences={prefs}', f'--battles={battles_file}'],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  counts = json.loads(proc.stdout)
  all_votes = votes.VoteStore(db).all()  # the browser test's vote may be there too
  decided = sum(v.vote in ('model_a', 'model_b') for v in all_votes)
  assert counts['pairs'] == decided and counts['votes'] == len(all_votes)
  assert counts['ties_left_out'] == sum(v.vote == 'tie' for v in all_votes) >= 2
  assert counts['both_bad_left_out'] == sum(v.vote == 'both_bad' for v in all_votes) >= 2
  rows = [json.loads(line) for line in prefs.read_text().splitlines()]
  first = next(v for v in all_votes if v.vote in ('model_a', 'model_b'))
  winner = first.answer_a if first.vote == 'model_a' else first.answer_b
  assert rows[0]['chosen'][0]['content'] == winner
  battle_log = [json.loads(line) for line in battles_file.read_text().splitlines()]
  assert {r['model'] for r in leaderboard.leaderboard(battle_log, rounds=10)} == {'alpha', 'beta'}

  env = xla_env.env(2)
  workdir = tmp_path / 'reward'
  proc = subprocess.run(
      [sys.executable, '-m', 'jpost.main', '--config=configs/reward.py:tiny',
       f'--workdir={workdir}', f'--config.model.path={tiny_checkpoint}',
       f'--config.data.train=("{prefs}",)', f'--config.data.eval=("{prefs}",)',
       '--config.data.max_len=256', '--config.data.policy=error'],  # markup is many tokens
      capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval_accuracy' in m for m in metrics)
  assert (workdir / 'hf' / 'config.json').is_file()


def test_store_takes_concurrent_writers(tmp_path):
  store = votes.VoteStore(tmp_path / 'votes.sqlite')

  def write(worker):
    for i in range(10):
      store.add(votes.Vote(prompt=f'{worker}-{i}', model_a='x', model_b='y', answer_a='a',
                           answer_b='b', vote=votes.VOTES[i % 4], session=str(worker)))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(write, range(8)))
  stored = store.all()
  assert len(stored) == 80 and len({v.prompt for v in stored}) == 80
  rows, counts = votes.preference_rows(stored)
  assert counts == {'pairs': 48, 'ties_left_out': 16, 'both_bad_left_out': 16} and len(rows) == 48


def test_bad_votes_and_battles_are_errors(arena):
  url = arena[0]

  def post(path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method='POST',
                                     headers={'Content-Type': 'application/json'})
    try:
      with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())
  assert post('/arena/battles', {'prompt': ''})[0] == 400
  battle = post('/arena/battles', {'prompt': 'hi'})[1]['battle']
  assert post(f'/arena/battles/{battle}/vote', {'vote': 'model_a'})[0] == 409  # not answered yet
  assert post(f'/arena/battles/{battle}/vote', {'vote': 'maybe'})[0] == 400
  assert post('/arena/battles/nope/vote', {'vote': 'tie'})[0] == 404


def test_an_answer_that_did_not_complete_may_be_asked_for_again(arena, monkeypatch):
  """A side refused while the server is busy (429) was once marked asked
  for: every retry got 409 and the battle could never be voted on."""
  url, _, served = arena
  calls = []
  for model in served.values():
    submit = model.engine.submit

    def busy_once(request, submit=submit):
      calls.append(1)
      if len(calls) == 1:
        raise engine.QueueFull('2 requests are already waiting.')
      return submit(request)
    monkeypatch.setattr(model.engine, 'submit', busy_once)
  request = urllib.request.Request(url + '/arena/battles', data=b'{"prompt": "hi"}',
                                   method='POST', headers={'Content-Type': 'application/json'})
  with urllib.request.urlopen(request, timeout=30) as response:
    battle = json.loads(response.read())['battle']
  with pytest.raises(urllib.error.HTTPError) as refused:
    urllib.request.urlopen(f'{url}/arena/battles/{battle}/a', timeout=60)
  assert refused.value.code == 429
  for side in 'ab':
    with urllib.request.urlopen(f'{url}/arena/battles/{battle}/{side}', timeout=60) as response:
      assert b'"done": true' in response.read()
  with pytest.raises(urllib.error.HTTPError) as again:  # a whole answer is not drawn twice
    urllib.request.urlopen(f'{url}/arena/battles/{battle}/a', timeout=60)
  assert again.value.code == 409
  vote = urllib.request.Request(url + f'/arena/battles/{battle}/vote', method='POST',
                                data=b'{"vote": "tie"}', headers={'Content-Type': 'application/json'})
  with urllib.request.urlopen(vote, timeout=30) as response:
    assert json.loads(response.read())['vote'] == 'tie'
