"""The OpenAI-compatible server, through the real `openai` client against a
server started on a free loopback port (one per module): greedy answers
equal jpost.sampling.generate token for token, 64 concurrent streams equal
the same requests served alone, every bad request class gets its status and
OpenAI-style JSON error, and a client killed mid-stream frees its slot."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest
from safetensors.numpy import load_file, save_file

from jpost import sampling
from jpost.models import hf
from jpost.rewards import judges
from jpost.eval import pairwise
from jpost.serve import api, engine, recipe, text
from jpost.tokenizer import Tokenizer

SLOTS = 8
CACHE_LEN = 1024
PROMPTS = ['What is the capital of France?', 'Write a haiku about the sea.',
           'List three prime numbers and explain why they are prime, please.']


@pytest.fixture(scope='module')
def checkpoint(tiny_checkpoint, tmp_path_factory):
  """The tiny random Llama with its weights scaled up: at the usual init a
  2-layer model's next-token distribution is nearly flat and greedy repeats
  one token; scaled, it says varied things with peaked distributions, so
  greedy choices do not hinge on float rounding (as a trained model's rarely do)."""
  path = tmp_path_factory.mktemp('peaked')
  for item in tiny_checkpoint.iterdir():
    if item.name != 'model.safetensors':
      (path / item.name).write_bytes(item.read_bytes())
  tensors = load_file(tiny_checkpoint / 'model.safetensors')
  tensors = {k: v * 10 if 'embed' in k or 'proj' in k else v for k, v in tensors.items()}
  save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
  return path


def test_a_cache_longer_than_the_models_context_is_cut_to_it_and_said(tiny_checkpoint, capsys):
  limit = json.loads((tiny_checkpoint / 'config.json').read_text())['max_position_embeddings']
  models = recipe.load_models({'tiny': str(tiny_checkpoint)}, dtype='float32',
                              engine_config=engine.EngineConfig(slots=2, cache_len=limit * 2))
  assert models['tiny'].engine.config.cache_len == limit
  assert (f"serve: model 'tiny': engine.cache_len {limit * 2} -> {limit}, its "
          'max_position_embeddings') in capsys.readouterr().err


@pytest.fixture(scope='module')
def served(checkpoint):
  """Two apps over the same started engine: an open one, and one with an API
  key, a small body limit and one request at a time."""
  models = recipe.load_models({'tiny': str(checkpoint)}, dtype='float32',
                              engine_config=engine.EngineConfig(slots=SLOTS, cache_len=CACHE_LEN))
  models['tiny'].engine.start()
  open_server = recipe.Background(recipe.build_app(models, api.ServerConfig()))
  strict = recipe.Background(recipe.build_app(models, api.ServerConfig(
      api_key='sesame', max_body_bytes=4000, max_concurrent_requests=1)))
  yield models['tiny'], open_server.url, strict.url
  open_server.stop()
  strict.stop()
  models['tiny'].engine.stop()


@pytest.fixture(scope='module')
def client(served):
  return openai.OpenAI(base_url=served[1] + '/v1', api_key='unused', max_retries=0, timeout=60)


def _generate(checkpoint, prompt_ids, max_new_tokens):
  """Token ids and log-probs of jpost.sampling.generate, greedy."""
  model, tokenizer = hf.load(checkpoint), Tokenizer.from_dir(checkpoint)
  tokens, mask = sampling.left_pad([prompt_ids], tokenizer.pad_id)
  out = jax.device_get(sampling.generate(model, tokens, mask, sampling.SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)))
  ids = [int(t) for t in out.tokens[0][:out.lengths[0]]]
  return ids, out.logprobs[0][:len(ids)], tokenizer


def test_models_lists_the_served_model(client):
  assert [m.id for m in client.models.list()] == ['tiny']


def test_greedy_chat_equals_generate_token_for_token(client, checkpoint, served):
  tokenizer = served[0].tokenizer
  for prompt in PROMPTS[2:]:  # one prompt: each length compiles generate anew
    messages = [{'role': 'user', 'content': prompt}]
    reply = client.chat.completions.create(model='tiny', messages=messages, max_tokens=24,
                                           temperature=0, logprobs=True)
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
    expected, logprobs, tok = _generate(checkpoint, ids, 24)
    content = [t for t in expected if t not in tok.stop_ids]
    served_tokens = reply.choices[0].logprobs.content
    assert [t.token for t in served_tokens] == [tok.decode([t]) for t in content]
    np.testing.assert_allclose([t.logprob for t in served_tokens], logprobs[:len(content)],
                               rtol=1e-4, atol=1e-4)
    assert reply.choices[0].message.content == tok.decode(content)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason == ('stop' if len(content) < len(expected) else 'length')


def test_completions_and_streaming_agree(client):
  prompt = 'Once upon a time'
  whole = client.completions.create(model='tiny', prompt=prompt, max_tokens=16, temperature=0,
                                    logprobs=2)
  assert whole.choices[0].text and whole.usage.completion_tokens == 16
  assert all(len(top) == 2 for top in whole.choices[0].logprobs.top_logprobs)
  pieces = [c.choices[0].text for c in client.completions.create(
      model='tiny', prompt=prompt, max_tokens=16, temperature=0, stream=True)]
  assert ''.join(pieces) == whole.choices[0].text
  chat = client.chat.completions.create(
      model='tiny', messages=[{'role': 'user', 'content': prompt}], max_tokens=16, temperature=0)
  assert chat.choices[0].message.content != whole.choices[0].text  # the chat template applies


def test_stop_strings_end_the_answer_before_them(client):
  messages = [{'role': 'user', 'content': PROMPTS[1]}]
  full = client.chat.completions.create(model='tiny', messages=messages, max_tokens=32,
                                        temperature=0).choices[0].message.content
  stop = full[len(full) // 2:len(full) // 2 + 3]
  assert stop.strip(), f'the answer {full!r} has no text to stop at'
  cut = client.chat.completions.create(model='tiny', messages=messages, max_tokens=32,
                                       temperature=0, stop=[stop, 'never appears'])
  assert cut.choices[0].message.content == full[:full.index(stop)]
  assert cut.choices[0].finish_reason == 'stop'
  streamed = client.chat.completions.create(model='tiny', messages=messages, max_tokens=32,
                                            temperature=0, stop=stop, stream=True)
  assert ''.join(c.choices[0].delta.content or '' for c in streamed) == full[:full.index(stop)]


def test_n_choices_and_seed_replay(client):
  ask = lambda seed: client.chat.completions.create(
      model='tiny', messages=[{'role': 'user', 'content': 'Tell me a story.'}], max_tokens=12,
      temperature=2.0, top_p=0.95, n=3, seed=seed)
  first, again, other = ask(7), ask(7), ask(8)
  texts = lambda r: [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
  assert [c.index for c in first.choices] == [0, 1, 2]
  assert texts(first) == texts(again)
  assert len(set(texts(first))) > 1  # each choice its own sample
  assert texts(first) != texts(other)


def _stream_text(client, prompt, max_tokens):
  pieces = client.chat.completions.create(
      model='tiny', messages=[{'role': 'user', 'content': prompt}], max_tokens=max_tokens,
      temperature=0, stream=True)
  return ''.join(c.choices[0].delta.content or '' for c in pieces if c.choices)


def test_64_concurrent_streams_equal_the_same_requests_alone(client, served):
  requests = [(f'Question {i}: ' + 'why is the sky blue? ' * (i % 5 + 1), 3 + (i * 7) % 19)
              for i in range(64)]
  alone = [client.chat.completions.create(
      model='tiny', messages=[{'role': 'user', 'content': p}], max_tokens=n,
      temperature=0).choices[0].message.content for p, n in requests]
  before = served[0].engine.metrics()
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    futures = [pool.submit(_stream_text, client, p, n) for p, n in requests]
    together = [f.result(timeout=120) for f in futures]
  assert together == alone
  after = served[0].engine.metrics()
  assert after['requests_started'] - before['requests_started'] == 64
  # They shared the batch: far fewer steps than tokens.
  steps = after['decode_steps'] - before['decode_steps']
  tokens = after['completion_tokens'] - before['completion_tokens']
  assert steps < tokens / 4, (steps, tokens)
  assert after['slots_busy'] == 0


def _post(url, body: bytes | dict, headers=None):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method='POST', headers={
      'Content-Type': 'application/json', **(headers or {})})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


CHAT = {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}
BAD_REQUESTS = [
    ('unknown model', dict(CHAT, model='gpt-9'), 404, 'model_not_found'),
    ('prompt over the context', dict(CHAT, messages=[{'role': 'user', 'content': 'hi ' * 1200}]),
     400, 'context_length_exceeded'),
    ('max_tokens past the context', dict(CHAT, max_tokens=CACHE_LEN), 400, 'context_length_exceeded'),
    ('temperature out of range', dict(CHAT, temperature=7), 400, 'invalid_value'),
    ('top_p zero', dict(CHAT, top_p=0), 400, 'invalid_value'),
    ('n zero', dict(CHAT, n=0), 400, 'invalid_value'),
    ('n over the slots', dict(CHAT, n=SLOTS + 1), 400, 'invalid_value'),
    ('max_tokens a string', dict(CHAT, max_tokens='many'), 400, 'invalid_value'),
    ('messages missing', {'model': 'tiny'}, 400, 'invalid_value'),
    ('bad role', dict(CHAT, messages=[{'role': 'wizard', 'content': 'x'}]), 400, 'invalid_value'),
    ('stop not text', dict(CHAT, stop=[1, 2]), 400, 'invalid_value'),
    ('malformed JSON', b'{"model": "tiny", "messages": [', 400, 'invalid_json'),
    ('a JSON list', b'[1, 2]', 400, 'invalid_json'),
    # JSON's NaN passes every range comparison; it once decoded greedily.
    ('temperature NaN', b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": NaN}', 400, 'invalid_value'),
    ('top_p NaN', b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     b'"top_p": NaN}', 400, 'invalid_value'),
    # A lone surrogate is valid JSON but no text (the tokenizer raised a TypeError: a 500).
    ('a lone surrogate', b'{"model": "tiny", "messages": [{"role": "user", "content": '
     b'"hi \\ud800"}]}', 400, 'invalid_json'),
    # Settings the server cannot honour are refused, never dropped.
    ('json output asked for', dict(CHAT, response_format={'type': 'json_object'}), 400,
     'invalid_value'),
    ('a forced tool call', dict(CHAT, tools=[{'type': 'function', 'function': {'name': 'f'}}],
                                tool_choice='required'), 400, 'invalid_value'),
    ('logit bias', dict(CHAT, logit_bias={'42': 5}), 400, 'invalid_value'),
    ('top_k', dict(CHAT, top_k=5), 400, 'invalid_value'),
]


@pytest.mark.parametrize('what,body,status,code', BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(served, what, body, status, code):
  got, payload = _post(served[1] + '/v1/chat/completions', body)
  assert got == status, payload
  assert set(payload['error']) == {'message', 'type', 'param', 'code'}
  assert payload['error']['code'] == code and payload['error']['message']


def test_client_errors_map_to_openai_exceptions(client):
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model='nope', messages=[{'role': 'user', 'content': 'x'}])
  with pytest.raises(openai.BadRequestError, match='maximum context length'):
    client.completions.create(model='tiny', prompt='word ' * 2000, max_tokens=4)
  with pytest.raises(openai.NotFoundError):  # an unknown route is JSON too
    client.get('/nothing/here', cast_to=object)


def test_key_is_checked_on_every_route(served):
  assert _post(served[2] + '/v1/chat/completions', CHAT)[0] == 401
  assert _post(served[2] + '/v1/chat/completions', CHAT, {'Authorization': 'Bearer wrong'})[0] == 401
  for path in ('/health', '/v1/models', '/arena'):
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(served[2] + path, timeout=10)
    assert e.value.code == 401 and json.loads(e.value.read())['error']['code'] == 'invalid_api_key'


def test_body_limit_and_too_many_requests(served):
  url = served[2] + '/v1/chat/completions'
  key = {'Authorization': 'Bearer sesame'}
  status, payload = _post(url, dict(CHAT, messages=[{'role': 'user', 'content': 'x' * 5000}]), key)
  assert status == 413 and payload['error']['code'] == 'request_too_large'
  assert _post(url, CHAT, key)[0] == 200
  strict = openai.OpenAI(base_url=served[2] + '/v1', api_key='sesame', max_retries=0)
  long_one = strict.chat.completions.create(
      model='tiny', messages=[{'role': 'user', 'content': 'go'}], max_tokens=900, stream=True)
  next(iter(long_one))  # it is running now
  with pytest.raises(openai.RateLimitError):
    strict.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'x'}],
                                   max_tokens=2)
  long_one.close()


_KILLED_CLIENT = r'''
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
body = b'{"model": "tiny", "stream": true, "max_tokens": 900, "temperature": 1.0, "seed": 1,' \
       b' "messages": [{"role": "user", "content": "Talk for a long time."}]}'
sock = socket.create_connection((host, port))
sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
             b'Content-Length: %d\r\n\r\n' % len(body) + body)
sock.settimeout(30)
received = b''
while b'data:' not in received:
  chunk = sock.recv(4096)
  if not chunk:
    break
  received += chunk
print('streaming' if b'data:' in received else received.decode(errors='replace'), flush=True)
time.sleep(60)
'''


def _health(url):
  with urllib.request.urlopen(url + '/health', timeout=10) as r:
    return json.loads(r.read())['models']['tiny']


def _idle_health(url, seconds=30):
  """/health once no request of an earlier test is still running (bounded)."""
  deadline = time.monotonic() + seconds
  while True:
    now = _health(url)
    if (now['slots_busy'] == 0 and now['requests_waiting'] == 0) or time.monotonic() > deadline:
      return now
    time.sleep(0.05)


def test_client_killed_mid_stream_frees_its_slot(served):
  url = served[1]
  before = _idle_health(url)
  assert before['slots_busy'] == 0, before
  host, port = url.removeprefix('http://').split(':')
  client = subprocess.Popen([sys.executable, '-c', _KILLED_CLIENT, host, port],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert client.stdout.readline().strip() == 'streaming'
    assert _health(url)['slots_busy'] == 1
  finally:
    os.kill(client.pid, signal.SIGKILL)
    client.wait(timeout=10)
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    now = _health(url)
    if now['slots_busy'] == 0:
      break
    time.sleep(0.02)
  assert now['slots_busy'] == 0
  assert now['requests_cancelled'] == before.get('requests_cancelled', 0) + 1
  # It left long before its 900 tokens.
  assert now['completion_tokens'] - before['completion_tokens'] < 800


def test_judges_work_against_the_server_unchanged(served, client):
  base = served[1] + '/v1'
  chat = judges.openai_chat(base, 'tiny', max_tokens=12)
  messages = [{'role': 'user', 'content': PROMPTS[0]}]
  direct = client.chat.completions.create(model='tiny', messages=messages, max_tokens=12,
                                          temperature=0, seed=0).choices[0].message.content
  assert chat(messages) == direct
  # The random model cannot judge, but every call reached the server and
  # came back as a chat completion: the failure is the verdict's format.
  result = pairwise.judge_pair(chat, 'What is 2 + 2?', '4', '5', retries=1)
  assert result.invalid == 2 and not result.failure.startswith('chat_error'), result.failure


@pytest.mark.parametrize('text_so_far,stops,final,expected', [
    ('hello wor', ('world',), False, ('hello ', False)),
    ('hello world!', ('world',), False, ('hello ', True)),
    ('caf\ufffd', (), False, ('caf', False)),
    ('hello wor', ('world',), True, ('hello wor', False)),
    ('abc', ('x',), False, ('abc', False)),
])
def test_releasable_text(text_so_far, stops, final, expected):
  assert text.releasable(text_so_far, stops, final) == expected


def test_static_mode_waits_for_a_full_batch(checkpoint):
  """Static batching runs one batch to its end before the next joins:
  4 requests on 2 slots take the steps of two batches, one after the other."""
  model, tokenizer = hf.load(checkpoint), Tokenizer.from_dir(checkpoint)
  runner = engine.Engine(model, tokenizer, engine.EngineConfig(
      slots=2, cache_len=128, mode='static', static_wait_s=0.2)).start()
  try:
    done, ends = threading.Semaphore(0), {}

    def emit(i):
      def record(event):
        if isinstance(event, engine.ChoiceEnd):
          ends[i] = event.completion_tokens
          done.release()
      return record
    for i, n in enumerate((3, 20, 3, 3)):
      runner.submit(engine.Request(prompt_ids=tokenizer.encode('one two'), max_tokens=n,
                                   temperature=0.0, emit=emit(i)))
    for _ in range(4):
      assert done.acquire(timeout=60)
    # Batch 1 (requests 0 and 1) runs until its longest ends, then batch 2;
    # in continuous mode request 2 would have joined as soon as request 0 ended.
    assert ends[1] > ends[0]
    assert runner.metrics()['decode_steps'] == max(ends[0], ends[1]) + max(ends[2], ends[3])
  finally:
    runner.stop()


def test_a_full_queue_refuses_more_requests(checkpoint):
  """`max_waiting` requests queue beyond the running ones; the next one is
  refused (the API answers it with 429) and nothing is lost from the queue."""
  model, tokenizer = hf.load(checkpoint), Tokenizer.from_dir(checkpoint)
  waiting = engine.Engine(model, tokenizer, engine.EngineConfig(slots=2, cache_len=128,
                                                               max_waiting=2))  # not started
  request = lambda: engine.Request(prompt_ids=tokenizer.encode('one two'), max_tokens=3,
                                   temperature=0.0, emit=lambda event: None)
  waiting.submit(request())
  waiting.submit(request())
  with pytest.raises(engine.QueueFull, match='2 requests are already waiting'):
    waiting.submit(request())
  assert waiting.metrics()['requests_waiting'] == 2


def test_a_prompt_that_fails_to_load_ends_its_requests_with_an_error(checkpoint, monkeypatch):
  """A prefill that raises (out of memory, say) must answer the request and
  every other one admitted with it: they had left the queue and were in no
  slot, so their clients once waited forever. The engine serves on after."""
  from jpost.serve import programs
  model, tokenizer = hf.load(checkpoint), Tokenizer.from_dir(checkpoint)
  runner = engine.Engine(model, tokenizer, engine.EngineConfig(
      slots=4, cache_len=128, mode='static', static_wait_s=0.5)).start()
  prefill, calls = programs.prefill, []

  def failing_once(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError('RESOURCE_EXHAUSTED: out of memory')
    return prefill(*args, **kwargs)
  monkeypatch.setattr(programs, 'prefill', failing_once)
  try:
    events = {i: [] for i in range(3)}
    ended = threading.Semaphore(0)

    def emit(i):
      def record(event):
        events[i].append(event)
        if isinstance(event, (engine.ChoiceEnd, engine.Failure)):
          ended.release()
      return record
    # Static mode admits the two together (their 4 choices fill the slots).
    for i in range(2):
      runner.submit(engine.Request(prompt_ids=tokenizer.encode('one two'), max_tokens=3, n=2,
                                   temperature=0.0, emit=emit(i)))
    for _ in range(2):
      assert ended.acquire(timeout=60), events
    assert all(isinstance(events[i][-1], engine.Failure) for i in range(2)), events
    assert 'out of memory' in events[0][-1].message
    assert runner.metrics()['slots_busy'] == 0
    runner.submit(engine.Request(prompt_ids=tokenizer.encode('one two'), max_tokens=3,
                                 temperature=0.0, emit=emit(2)))
    assert ended.acquire(timeout=60) and isinstance(events[2][-1], engine.ChoiceEnd)
  finally:
    runner.stop()


def test_logprobs_of_tokens_inside_a_character_keep_their_bytes(checkpoint):
  """'你好' is four SmolLM2 tokens of 2, 1, 2 and 1 bytes: each decodes alone to
  U+FFFD, so bytes and offsets computed from decoded text were wrong."""
  tokenizer = Tokenizer.from_dir(checkpoint)
  ids = tokenizer.encode('你好 world')
  infos = [engine.TokenInfo(i, tokenizer.token_bytes(i), -0.5, ((tokenizer.token_bytes(i), -0.5),))
           for i in ids]
  chat = [api._token_logprob(info) for info in infos]
  assert bytes(b for item in chat for b in item['bytes']).decode() == '你好 world'
  assert chat[0]['token'] == 'bytes:\\xe4\\xbd' and chat[-1]['token'] == ' world'
  legacy = api._completion_logprobs(infos, 3)
  assert legacy['text_offset'] == [3, 3, 4, 4, 5]  # a character's parts share its offset
  assert len({key for top in legacy['top_logprobs'] for key in top}) == len(ids)
