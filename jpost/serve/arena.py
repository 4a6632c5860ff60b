"""The Arena: blind side-by-side answers of two served models, a vote, and
a leaderboard.

  GET  /arena                          the page (jpost.serve.pages)
  POST /arena/battles                  {prompt, session} -> {battle}: two models drawn at random
  GET  /arena/battles/{id}/{a|b}       one side's answer, streamed (server-sent events)
  POST /arena/battles/{id}/vote        {vote, session} -> the two models' names
  GET  /arena/leaderboard[.json]       Bradley-Terry ratings, bootstrap intervals, win matrix

The answers are kept by the server as they are generated, so a vote stores
what the models said, not what a page reports. Which model is A stays on
the server until the vote.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import json
import math
import random
import threading
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from jpost.eval import leaderboard as leaderboard_lib
from jpost.eval import pairwise
from jpost.serve import api, engine as engine_lib, pages, params, votes as votes_lib
from jpost.serve.params import ApiError

MAX_PROMPT_CHARS = 4000
MAX_OPEN_BATTLES = 1000  # unvoted battles kept; the oldest are forgotten first


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArenaConfig:
  max_tokens: int = 256
  temperature: float = 0.7
  bootstrap_rounds: int = 200


@dataclasses.dataclass(eq=False)
class _Battle:
  prompt: str
  session: str
  models: tuple[str, str]
  answers: list = dataclasses.field(default_factory=lambda: [None, None])
  started: list = dataclasses.field(default_factory=lambda: [False, False])


class Arena:
  def __init__(self, server: api.Server, store: votes_lib.VoteStore, config: ArenaConfig,
               seed: int | None = None):
    self.server, self.store, self.config = server, store, config
    self._battles: collections.OrderedDict[str, _Battle] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._rng = random.Random(seed)

  def open_battle(self, prompt: str, session: str) -> str:
    names = sorted(self.server.models)
    if len(names) < 2:
      raise ApiError(400, f'The Arena needs at least two served models; this server has {names}.')
    battle = _Battle(prompt, session, tuple(self._rng.sample(names, 2)))
    ident = uuid.uuid4().hex
    with self._lock:
      self._battles[ident] = battle
      while len(self._battles) > MAX_OPEN_BATTLES:
        self._battles.popitem(last=False)
    return ident

  def battle(self, ident: str) -> _Battle:
    with self._lock:
      if ident not in self._battles:
        raise ApiError(404, f'No open battle {ident!r} (already voted on, or expired).',
                       code='battle_not_found')
      return self._battles[ident]

  def close_battle(self, ident: str, vote: str, session: str) -> dict:
    with self._lock:
      battle = self._battles.get(ident)
      if battle is None:
        raise ApiError(404, f'No open battle {ident!r} (already voted on, or expired).',
                       code='battle_not_found')
      if any(answer is None for answer in battle.answers):
        raise ApiError(409, 'Both answers must be complete before the vote.', code='not_ready')
      del self._battles[ident]
    self.store.add(votes_lib.Vote(
        prompt=battle.prompt, model_a=battle.models[0], model_b=battle.models[1],
        answer_a=battle.answers[0], answer_b=battle.answers[1], vote=vote,
        session=session or battle.session))
    return {'model_a': battle.models[0], 'model_b': battle.models[1], 'vote': vote}


def leaderboard_data(all_votes: list[votes_lib.Vote], rounds: int) -> dict:
  """Ratings (with bootstrap intervals), the win matrix and vote counts; a
  log the ratings cannot be fitted on yet gives a `note` instead of rows."""
  data = {'counts': votes_lib.vote_counts(all_votes), 'rows': [], 'matrix': None, 'note': None}
  battles = votes_lib.battle_rows(all_votes)
  if not battles:
    data['note'] = 'No votes yet.'
    return data
  try:
    data['rows'] = leaderboard_lib.leaderboard(battles, rounds=rounds)
  except ValueError as e:  # e.g. models that never met each other
    data['note'] = str(e)
  rates = pairwise.win_rates(battles)
  for row in data['rows']:
    row.update({k: rates[row['model']][k] for k in ('wins', 'losses', 'ties', 'both_bad')})
  models, rate, games = pairwise.win_matrix(battles)
  data['matrix'] = {'models': list(models),
                    'rate': [[None if math.isnan(x) else float(x) for x in r] for r in rate],
                    'games': games.astype(int).tolist()}
  return data


def _leaderboard_html(data: dict) -> str:
  esc = lambda x: html.escape(str(x))
  parts = [f'<p id="counts">{data["counts"]["total"]} votes: '
           + ', '.join(f'{esc(k)} {v}' for k, v in data['counts'].items() if k != 'total')
           + '</p>']
  if data['note']:
    parts.append(f'<p id="note">{esc(data["note"])}</p>')
  if data['rows']:
    head = ('<tr><th>Rank</th><th>Model</th><th>Rating</th><th>95% interval</th><th>Battles</th>'
            '<th>Wins</th><th>Losses</th><th>Ties</th><th>Both bad</th><th>Win rate</th></tr>')
    body = ''.join(
        f'<tr><td>{r["rank"]}</td><td class="model">{esc(r["model"])}</td>'
        f'<td class="rating">{r["rating"]:.0f}</td><td>{r["low"]:.0f} to {r["high"]:.0f}</td>'
        f'<td>{r["battles"]}</td><td>{r["wins"]}</td><td>{r["losses"]}</td><td>{r["ties"]}</td>'
        f'<td>{r["both_bad"]}</td><td>{r["win_rate"]:.2f}</td></tr>' for r in data['rows'])
    parts.append(f'<h2>Bradley-Terry ratings</h2><table id="ratings">{head}{body}</table>')
  if data['matrix']:
    models = data['matrix']['models']
    head = '<tr><th>row vs column</th>' + ''.join(f'<th>{esc(m)}</th>' for m in models) + '</tr>'
    rows = ''.join(
        f'<tr><th>{esc(m)}</th>' + ''.join(
            '<td>-</td>' if rate is None else f'<td>{rate:.2f} ({games})</td>'
            for rate, games in zip(data['matrix']['rate'][i], data['matrix']['games'][i]))
        + '</tr>' for i, m in enumerate(models))
    parts.append('<h2>Win rate (battles)</h2><table id="matrix">' + head + rows + '</table>')
  return pages.LEADERBOARD.replace('{{body}}', '\n'.join(parts))


def _session(value) -> str:
  return value[:64] if isinstance(value, str) else ''


def add_routes(app: FastAPI, arena: Arena) -> None:
  server = arena.server

  @app.get('/arena', response_class=HTMLResponse)
  async def page():
    return pages.ARENA

  @app.post('/arena/battles')
  async def new_battle(request: Request):
    body = await api.read_json(request, server.config.max_body_bytes)
    prompt = body.get('prompt')
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
      raise ApiError(400, f'prompt: give a question of 1 to {MAX_PROMPT_CHARS} characters.',
                     param='prompt', code='invalid_value')
    return {'battle': arena.open_battle(prompt, _session(body.get('session')))}

  @app.get('/arena/battles/{ident}/{side}')
  async def answer(ident: str, side: str):
    if side not in ('a', 'b'):
      raise ApiError(404, 'side must be "a" or "b".', code='not_found')
    battle = arena.battle(ident)
    index = 'ab'.index(side)
    if battle.started[index]:
      raise ApiError(409, f'Answer {side.upper()} of this battle was already asked for.',
                     code='already_started')
    served = server.models[battle.models[index]]
    settings = params.settings({'max_tokens': arena.config.max_tokens,
                                'temperature': arena.config.temperature}, chat=True, max_n=1)
    ids = served.tokenizer.encode_chat([{'role': 'user', 'content': battle.prompt}],
                                       add_generation_prompt=True).ids
    if len(ids) + settings.max_tokens > served.engine.config.cache_len:
      raise ApiError(400, 'The question is too long for the models; shorten it.',
                     param='prompt', code='context_length_exceeded')
    # Asked for once: a second stream would let a voter re-draw an answer. An
    # answer that did not complete (the server busy, the model failing, the
    # stream dropped) may be asked for again, or the battle could never be voted on.
    battle.started[index] = True
    try:
      events = server.events(served, ids, settings)
      first = await anext(events)
    except BaseException:
      battle.started[index] = False
      raise

    async def body():
      text = ''
      async def all_events():
        yield first
        async for event in events:
          yield event
      try:
        async for event in all_events():
          if isinstance(event, engine_lib.Delta) and event.text:
            text += event.text
            yield f'data: {json.dumps({"text": event.text})}\n\n'
        battle.answers[index] = text
        yield f'data: {json.dumps({"done": True})}\n\n'
      except ApiError as e:
        yield f'data: {json.dumps(e.body())}\n\n'
      finally:
        if battle.answers[index] is None:
          battle.started[index] = False

    return StreamingResponse(body(), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache'})

  @app.post('/arena/battles/{ident}/vote')
  async def vote(ident: str, request: Request):
    body = await api.read_json(request, server.config.max_body_bytes)
    choice = body.get('vote')
    if choice not in votes_lib.VOTES:
      raise ApiError(400, f'vote: give one of {list(votes_lib.VOTES)}.', param='vote',
                     code='invalid_value')
    return arena.close_battle(ident, choice, _session(body.get('session')))

  @app.get('/arena/leaderboard.json')
  def leaderboard_json():  # a plain def: FastAPI runs it off the event loop
    return leaderboard_data(arena.store.all(), arena.config.bootstrap_rounds)

  @app.get('/arena/leaderboard', response_class=HTMLResponse)
  def leaderboard_page():
    return _leaderboard_html(leaderboard_data(arena.store.all(), arena.config.bootstrap_rounds))
