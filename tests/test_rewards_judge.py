"""The rubric judge against a real local HTTP server speaking OpenAI chat completions."""

import collections
import dataclasses
import http.server
import json
import threading

import numpy as np
import pytest

from jpost import rewards
from jpost.rewards import rubric as rubric_lib

VALID = json.dumps({'helpfulness': 6, 'factuality': 5, 'clarity': 7,
                    'rationale': 'Covers the main complaints; one claim is vague.'})
# Hand-computed: weights 0.4/0.4/0.2 on (s - 1) / 6 -> 0.4*5/6 + 0.4*4/6 + 0.2*6/6 = 0.8.
VALID_SCORE = 0.8

SAFETY_RUBRIC = {
    'criteria': [{'name': 'helpfulness', 'description': 'Answers the question.', 'weight': 1},
                 {'name': 'safety', 'description': 'No harmful advice.', 'weight': 1}],
    'scale': {'min': 1, 'max': 7},
    'gates': [{'criterion': 'safety', 'below': 4, 'then': 0.0}],
}


class _Judge(http.server.BaseHTTPRequestHandler):
  """Replies from a script per model name: (status, content) items, the last repeated."""
  scripts: dict = {}
  requests: list = []

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    type(self).requests.append((self.path, dict(self.headers), body))
    script = type(self).scripts[body['model']]
    status, content = script.popleft() if len(script) > 1 else script[0]
    if status == 200:
      payload = json.dumps({'object': 'chat.completion', 'choices': [
          {'index': 0, 'message': {'role': 'assistant', 'content': content},
           'finish_reason': 'stop'}]}).encode()
    else:
      payload = content.encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(payload)))
    self.end_headers()
    self.wfile.write(payload)

  def log_message(self, *args):
    pass


@pytest.fixture(scope='module')
def server():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Judge)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}/v1'
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def judge(server, monkeypatch):
  """judge(*replies) -> a JudgeSpec whose model name selects those replies."""
  for name in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(name, raising=False)
  count = [0]

  def make(*replies, **fields):
    count[0] += 1
    model = f'judge-{len(_Judge.scripts)}-{count[0]}'
    _Judge.scripts[model] = collections.deque(
        r if isinstance(r, tuple) else (200, r) for r in replies)
    return rewards.JudgeSpec(endpoint=server, model=model, retry_delay=0.0, **fields)
  return make


def _amazon(judge_spec):
  return dataclasses.replace(rewards.AMAZON_SUMMARY_RUBRIC, judge=judge_spec)


def _judge(spec, response='Most buyers love the battery; a few report a loose hinge.'):
  chat = rubric_lib.make_chat(spec.judge)
  return rewards.judge_rubric(spec, chat, 'Summarise these reviews: ...', response)


def test_valid_reply_gives_the_hand_computed_score(judge, monkeypatch):
  monkeypatch.setenv('JUDGE_KEY', 'secret-token')
  spec = _amazon(judge(VALID, temperature=0.3, seed=7, max_tokens=99, api_key_env='JUDGE_KEY'))
  result = _judge(spec)
  assert result.score == pytest.approx(VALID_SCORE)
  assert result.scores == {'helpfulness': 6, 'factuality': 5, 'clarity': 7}
  assert result.rationale.startswith('Covers the main')
  assert (result.failure, result.attempts) == (None, 1)
  path, headers, body = _Judge.requests[-1]
  assert path == '/v1/chat/completions'
  assert headers['Authorization'] == 'Bearer secret-token'
  assert (body['temperature'], body['seed'], body['max_tokens']) == (0.3, 7, 99)
  text = body['messages'][0]['content']
  assert 'loose hinge' in text and 'Summarise these reviews' in text
  assert 'factuality (weight 0.4)' in text and 'from 1 (worst) to 7 (best)' in text


def test_fenced_reply_is_accepted(judge):
  result = _judge(_amazon(judge(f'```json\n{VALID}\n```')))
  assert result.score == pytest.approx(VALID_SCORE)


def test_invalid_then_valid_is_retried(judge):
  result = _judge(_amazon(judge('Sure! Here is my grade: 6/7', VALID)))
  assert result.score == pytest.approx(VALID_SCORE)
  assert result.attempts == 2


def test_always_invalid_is_a_failure(judge):
  result = _judge(_amazon(judge('{"helpfulness": 6,')))
  assert (result.score, result.failure, result.attempts) == (None, 'invalid_json', 3)


def test_gate_caps_the_score(judge):
  spec = dataclasses.replace(rewards.RubricSpec.from_dict(SAFETY_RUBRIC),
                             judge=judge('{"helpfulness": 7, "safety": 2, "rationale": "x"}'))
  assert _judge(spec).score == 0.0
  spec = dataclasses.replace(spec, judge=judge('{"helpfulness": 7, "safety": 4, "rationale": "x"}'))
  assert _judge(spec).score == pytest.approx(0.5 * 1 + 0.5 * 0.5)


def test_rubric_reward_counts_failures_and_goes_on(judge):
  """Four completions, each judged by its own scripted model: valid, HTTP 500
  (retried, then counted), invalid JSON forever, and an out-of-range score."""
  specs = [judge(VALID), judge((500, 'overloaded')), judge('not json'),
           judge('{"helpfulness": 9, "factuality": 5, "clarity": 7, "rationale": "x"}')]
  chats = {s.model: rubric_lib.make_chat(s) for s in specs}

  def chat_by_completion(messages):  # the completion text names the model to ask
    model = next(m for m in chats if f'[{m}]' in messages[0]['content'])
    return chats[model](messages)

  sources = rewards.build({'rubric': {'rubric': 'amazon_summary', 'chat': chat_by_completion,
                                      'judge': {'retry_delay': 0.0}}})
  completions = [f'summary [{s.model}]' for s in specs]
  result = rewards.score(sources, ['p'] * 4, completions, [{}] * 4)
  values = result.per_source['rubric']
  assert values[0] == pytest.approx(VALID_SCORE)
  assert np.isnan(values[1:]).all()
  np.testing.assert_allclose(result.total, [VALID_SCORE, 0, 0, 0], rtol=1e-6)
  failures = result.failures['rubric']
  assert (failures['http_error'], failures['invalid_json'], failures['out_of_range']) == (1, 1, 1)
  assert sum(1 for _, _, body in _Judge.requests if body['model'] == specs[1].model) == 3
  metrics = result.metrics()
  assert metrics['reward/rubric/failures'] == 3
  assert metrics['reward/rubric/criterion/factuality'] == 5


def test_rubric_reward_from_config_with_endpoint(judge, server):
  spec = judge(VALID)
  sources = rewards.build({'rubric': {'weight': 2.0, 'rubric': 'amazon_summary',
                                      'judge': {'endpoint': server, 'model': spec.model}}})
  result = rewards.score(sources, ['p', 'p'], ['a', 'b'], [{}, {}])
  np.testing.assert_allclose(result.total, [2 * VALID_SCORE] * 2, rtol=1e-6)


def test_http_client_error_is_not_retried(judge):
  result = _judge(_amazon(judge((404, '{"error": "no such model"}'))))
  assert (result.score, result.failure, result.attempts) == (None, 'http_error', 1)


def test_openai_chat_raises_judge_error_with_status(judge):
  spec = judge((500, 'overloaded'))
  chat = rewards.openai_chat(spec.endpoint, spec.model)
  with pytest.raises(rewards.JudgeError, match='HTTP 500: overloaded') as info:
    chat([{'role': 'user', 'content': 'hi'}])
  assert info.value.status == 500
  with pytest.raises(rewards.JudgeError, match='unreachable'):
    rewards.openai_chat('http://127.0.0.1:9', 'm', timeout=2)([])


@pytest.mark.parametrize('reply, kind', [
    ('[1, 2]', 'invalid_json'),
    ('{"helpfulness": 6, "factuality": 5, "rationale": "x"}', 'missing_criteria'),
    ('{"helpfulness": 6, "factuality": 5, "clarity": 7}', 'missing_criteria'),
    ('{"helpfulness": 6.5, "factuality": 5, "clarity": 7, "rationale": "x"}', 'not_integer'),
    ('{"helpfulness": "6", "factuality": 5, "clarity": 7, "rationale": "x"}', 'not_integer'),
    ('{"helpfulness": true, "factuality": 5, "clarity": 7, "rationale": "x"}', 'not_integer'),
    ('{"helpfulness": 0, "factuality": 5, "clarity": 7, "rationale": "x"}', 'out_of_range'),
])
def test_parse_reply_rejects(reply, kind):
  with pytest.raises(rubric_lib.InvalidReply) as info:
    rubric_lib.parse_reply(reply, rewards.AMAZON_SUMMARY_RUBRIC)
  assert info.value.kind == kind


def test_parse_reply_accepts_integral_floats():
  reply = '{"helpfulness": 6.0, "factuality": 5, "clarity": 7, "rationale": "x"}'
  scores, _ = rubric_lib.parse_reply(reply, rewards.AMAZON_SUMMARY_RUBRIC)
  assert scores['helpfulness'] == 6


@pytest.mark.parametrize('change, message', [
    ({'criteria': []}, 'at least one criterion'),
    ({'criteria': [{'name': 'a', 'description': 'd'}, {'name': 'a', 'description': 'd'}]},
     'unique'),
    ({'criteria': [{'name': 'a', 'description': 'd', 'weight': 0}]}, 'weight=0'),
    ({'criteria': [{'name': 'rationale', 'description': 'd'}]}, "other than 'rationale'"),
    ({'scale': {'min': 7, 'max': 1}}, 'min < max'),
    ({'gates': [{'criterion': 'honesty', 'below': 4}]}, "no such criterion"),
    ({'gates': [{'criterion': 'safety', 'below': 1}]}, 'never or always'),
    ({'gates': [{'criterion': 'safety', 'below': 4, 'then': 2}]}, r'then=2 must be in \[0, 1\]'),
    ({'judge': {'template': 'Grade {response}.'}},
     r"missing placeholders \['prompt', 'criteria'\]"),
    ({'judge': {'template': '{prompt} {response} {criteria} {"a": 1}'}}, 'literal braces'),
    ({'judge': {'retries': -1}}, 'retries=-1'),
    ({'judge': {'url': 'x'}}, r"unknown keys \['url'\]"),
    ({'weights': {}}, r"unknown keys \['weights'\]"),
])
def test_rubric_spec_validation(change, message):
  with pytest.raises(ValueError, match=message):
    rewards.RubricSpec.from_dict({**SAFETY_RUBRIC, **change})


def test_judge_spec_needs_a_backend():
  with pytest.raises(ValueError, match='set "endpoint" and "model"'):
    rubric_lib.make_chat(rewards.JudgeSpec())
  with pytest.raises(ValueError, match='unknown rubric|not a known rubric'):
    rewards.build({'rubric': {'rubric': 'movie_review'}})


def test_local_chat_judge(tiny_checkpoint):
  """A tiny random model as judge: its replies are not JSON, so the rubric
  fails cleanly; sampling replays from the seed and retries resample."""
  chat = rewards.local_chat(str(tiny_checkpoint), temperature=1.0, seed=3, max_new_tokens=6)
  messages = [{'role': 'user', 'content': 'Grade this.'}]
  first, second = chat(messages), chat(messages)
  assert isinstance(first, str) and first != second
  again = rewards.local_chat(str(tiny_checkpoint), temperature=1.0, seed=3, max_new_tokens=6)
  assert again(messages) == first
  # Questions of other lengths within one bucket of 64 positions reuse the
  # compiled decode loop (each length compiled its own before).
  from jpost import sampling
  compiled = sampling._generate._cache_size()
  for words in (3, 9, 20):
    chat([{'role': 'user', 'content': 'Grade this. ' + 'word ' * words}])
  assert sampling._generate._cache_size() == compiled
  spec = dataclasses.replace(rewards.AMAZON_SUMMARY_RUBRIC,
                             judge=rewards.JudgeSpec(retries=1))
  result = rewards.judge_rubric(spec, chat, 'p', 'r')
  assert (result.score, result.failure, result.attempts) == (None, 'invalid_json', 2)
