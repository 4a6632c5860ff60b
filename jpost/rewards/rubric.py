"""Rubric-guided LLM judge: criteria scored by a judge model, combined into [0, 1].

A rubric as a JSON-like dict (`RubricSpec.from_dict`):

  {"criteria": [{"name": "helpfulness", "description": "...", "weight": 0.4}, ...],
   "scale": {"min": 1, "max": 7},
   "gates": [{"criterion": "safety", "below": 4, "then": 0.0}],
   "judge": {"endpoint": "http://host:8000/v1", "model": "judge-model",
             "temperature": 0.0, "seed": 0, "max_tokens": 512, "retries": 2,
             "template": "... {prompt} ... {response} ... {criteria} ..."}}

The judge must reply with one JSON object, optionally in a ```json fence,
holding an integer score within the scale for every criterion and a
"rationale" string. Score = weighted mean of (s - min) / (max - min); a gate
whose criterion scores below `below` caps the score at `then`. An invalid
reply is asked again up to `retries` times; one that never parses is a
failure of kind 'invalid_json', 'missing_criteria', 'not_integer',
'out_of_range' or 'http_error'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import time
from collections.abc import Callable, Mapping

from jpost.rewards import judges
from jpost.rewards.registry import RewardFailure, Scored, register_factory

DEFAULT_TEMPLATE = """\
You are a strict, fair grader. Grade the response to the prompt below on each \
criterion with an integer from {min} (worst) to {max} (best).

# Prompt
{prompt}

# Response
{response}

# Criteria
{criteria}

Reply with only a JSON object holding an integer score for every criterion and a \
short "rationale" string, for example:
{example}"""
REQUIRED_FIELDS = ('prompt', 'response', 'criteria')
OPTIONAL_FIELDS = ('min', 'max', 'example')
_FENCED = re.compile(r'```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```', re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Criterion:
  name: str
  description: str
  weight: float = 1.0

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.strip() or self.name == 'rationale':
      raise ValueError(f"rubric criterion name {self.name!r}: use a non-empty name other "
                       "than 'rationale'.")
    if not isinstance(self.description, str) or not self.description.strip():
      raise ValueError(f'rubric criterion {self.name!r}: give it a description; the judge '
                       'reads it.')
    if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
            and self.weight > 0):
      raise ValueError(f'rubric criterion {self.name!r}: weight={self.weight!r} must be a '
                       'number > 0.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gate:
  criterion: str
  below: float  # the gate triggers when scores[criterion] < below
  then: float = 0.0  # ...and caps the overall score at this value in [0, 1]

  def __post_init__(self):
    if not 0.0 <= self.then <= 1.0:
      raise ValueError(f'rubric gate on {self.criterion!r}: then={self.then} must be in '
                       '[0, 1] (scores are in [0, 1]).')


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeSpec:
  endpoint: str | None = None  # OpenAI-compatible base URL, e.g. http://host:8000/v1
  model: str | None = None  # model name at the endpoint, or a jpost model path if no endpoint
  temperature: float = 0.0
  seed: int = 0
  max_tokens: int = 512
  timeout: float = 60.0  # seconds per HTTP request
  retries: int = 2  # further attempts after an invalid reply or a transient HTTP error
  retry_delay: float = 1.0  # seconds before retrying after an HTTP error
  api_key_env: str | None = 'OPENAI_API_KEY'
  template: str = DEFAULT_TEMPLATE

  def __post_init__(self):
    if not isinstance(self.retries, int) or self.retries < 0:
      raise ValueError(f'rubric judge: retries={self.retries!r} must be an integer >= 0.')
    if self.temperature < 0 or self.max_tokens <= 0 or self.timeout <= 0:
      raise ValueError('rubric judge: temperature must be >= 0, max_tokens and timeout > 0 '
                       f'(got {self.temperature}, {self.max_tokens}, {self.timeout}).')
    try:
      fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
    except ValueError as e:
      raise ValueError(f'rubric judge template: {e}; write literal braces as {{{{ and }}}}.'
                       ) from None
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    unknown = sorted(fields - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if missing or unknown:
      raise ValueError(f'rubric judge template: missing placeholders {missing}, unknown '
                       f'{unknown}; it must use {{prompt}}, {{response}}, {{criteria}} and '
                       'may use {min}, {max}, {example}; write literal braces as {{ and }}.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RubricSpec:
  criteria: tuple[Criterion, ...]
  scale_min: int = 1
  scale_max: int = 7
  gates: tuple[Gate, ...] = ()
  judge: JudgeSpec = JudgeSpec()

  def __post_init__(self):
    object.__setattr__(self, 'criteria', tuple(self.criteria))
    object.__setattr__(self, 'gates', tuple(self.gates))
    if not self.criteria:
      raise ValueError('rubric: give at least one criterion.')
    names = [c.name for c in self.criteria]
    if len(set(names)) != len(names):
      raise ValueError(f'rubric: criterion names must be unique, got {names}.')
    if not (isinstance(self.scale_min, int) and isinstance(self.scale_max, int)
            and self.scale_min < self.scale_max):
      raise ValueError(f'rubric scale: min={self.scale_min!r} and max={self.scale_max!r} '
                       'must be integers with min < max.')
    for gate in self.gates:
      if gate.criterion not in names:
        raise ValueError(f'rubric gate on {gate.criterion!r}: no such criterion; the '
                         f'criteria are {names}.')
      if not self.scale_min < gate.below <= self.scale_max:
        raise ValueError(f'rubric gate on {gate.criterion!r}: below={gate.below} never or '
                         f'always triggers; use a value in ({self.scale_min}, '
                         f'{self.scale_max}].')

  @classmethod
  def from_dict(cls, spec: Mapping) -> RubricSpec:
    """From the JSON-like shape in the module docstring."""
    spec = dict(spec)
    _check_keys('rubric', spec, ('criteria', 'scale', 'gates', 'judge'))
    scale = dict(spec.get('scale') or {})
    _check_keys('rubric scale', scale, ('min', 'max'))
    if 'criteria' not in spec:
      raise ValueError('rubric: no "criteria" list; give [{"name", "description", '
                       '"weight"}, ...].')
    criteria = []
    for item in spec['criteria']:
      _check_keys('rubric criterion', item, ('name', 'description', 'weight'))
      criteria.append(Criterion(**item))
    gates = []
    for item in spec.get('gates') or ():
      _check_keys('rubric gate', item, ('criterion', 'below', 'then'))
      gates.append(Gate(**item))
    judge = dict(spec.get('judge') or {})
    _check_keys('rubric judge', judge, [f.name for f in dataclasses.fields(JudgeSpec)])
    return cls(criteria=tuple(criteria), scale_min=scale.get('min', 1),
               scale_max=scale.get('max', 7), gates=tuple(gates), judge=JudgeSpec(**judge))

  def normalized(self, score: int) -> float:
    return (score - self.scale_min) / (self.scale_max - self.scale_min)

  def aggregate(self, scores: Mapping[str, int]) -> float:
    """Weighted mean of the normalised scores, capped by triggered gates."""
    total = sum(c.weight for c in self.criteria)
    value = sum(c.weight * self.normalized(scores[c.name]) for c in self.criteria) / total
    for gate in self.gates:
      if scores[gate.criterion] < gate.below:
        value = min(value, gate.then)
    return value

  def messages(self, prompt: str, response: str) -> list[dict]:
    """The chat sent to the judge."""
    criteria = '\n'.join(f'- {c.name} (weight {c.weight:g}): {c.description}'
                         for c in self.criteria)
    example = json.dumps({**{c.name: self.scale_max for c in self.criteria},
                          'rationale': 'One or two sentences.'})
    text = self.judge.template.format(prompt=prompt, response=response, criteria=criteria,
                                      min=self.scale_min, max=self.scale_max, example=example)
    return [{'role': 'user', 'content': text}]


def _check_keys(what: str, mapping, known) -> None:
  if not isinstance(mapping, Mapping):
    raise ValueError(f'{what}: expected a mapping, got {type(mapping).__name__}.')
  unknown = sorted(set(mapping) - set(known))
  if unknown:
    raise ValueError(f'{what}: unknown keys {unknown}; known keys are {sorted(known)}.')


class InvalidReply(Exception):
  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def parse_reply(text: str, spec: RubricSpec) -> tuple[dict[str, int], str]:
  """(scores, rationale) from a judge reply, or InvalidReply with its kind."""
  body = text.strip()
  if fenced := _FENCED.fullmatch(body):
    body = fenced.group(1).strip()
  try:
    reply = json.loads(body)
  except ValueError:
    raise InvalidReply('invalid_json', f'not JSON: {text[:200]!r}') from None
  if not isinstance(reply, dict):
    raise InvalidReply('invalid_json', f'not a JSON object: {text[:200]!r}')
  missing = [c.name for c in spec.criteria if c.name not in reply]
  if not isinstance(reply.get('rationale'), str):
    missing.append('rationale')
  if missing:
    raise InvalidReply('missing_criteria', f'missing {missing}')
  scores = {}
  for c in spec.criteria:
    value = reply[c.name]
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      raise InvalidReply('not_integer', f'{c.name}={value!r} is not an integer')
    if not spec.scale_min <= value <= spec.scale_max:
      raise InvalidReply('out_of_range', f'{c.name}={value} is outside '
                         f'[{spec.scale_min}, {spec.scale_max}]')
    scores[c.name] = value
  return scores, reply['rationale']


@dataclasses.dataclass(frozen=True)
class RubricResult:
  score: float | None  # in [0, 1]; None when the judge never gave a valid reply
  scores: dict[str, int]
  rationale: str
  failure: str | None  # the last attempt's failure kind when score is None
  attempts: int


def judge_rubric(spec: RubricSpec, chat: Callable[[list[dict]], str], prompt: str,
                 response: str) -> RubricResult:
  """Asks `chat` to grade `response`; retries invalid replies and transient
  HTTP errors up to `spec.judge.retries` times."""
  messages = spec.messages(prompt, response)
  failure = None
  for attempt in range(1, spec.judge.retries + 2):
    try:
      reply = chat(messages)
    except judges.JudgeError as e:
      failure = 'http_error'
      if not e.retryable:
        break
      if attempt <= spec.judge.retries:
        time.sleep(spec.judge.retry_delay)
      continue
    try:
      scores, rationale = parse_reply(reply, spec)
    except InvalidReply as e:
      failure = e.kind
      continue
    return RubricResult(spec.aggregate(scores), scores, rationale, None, attempt)
  return RubricResult(None, {}, '', failure, attempt)


def make_chat(judge: JudgeSpec) -> Callable[[list[dict]], str]:
  """The backend a JudgeSpec names: its endpoint, else a local jpost model."""
  if judge.endpoint:
    if not judge.model:
      raise ValueError('rubric judge: an endpoint needs a model name ("model").')
    return judges.openai_chat(judge.endpoint, judge.model, temperature=judge.temperature,
                              seed=judge.seed, max_tokens=judge.max_tokens,
                              timeout=judge.timeout, api_key_env=judge.api_key_env)
  if judge.model:
    return judges.local_chat(judge.model, temperature=judge.temperature, seed=judge.seed,
                             max_new_tokens=judge.max_tokens)
  raise ValueError('rubric judge: set "endpoint" and "model" (an OpenAI-compatible server) '
                   'or "model" alone (a jpost model path).')


AMAZON_SUMMARY_RUBRIC = RubricSpec(criteria=(
    Criterion(name='helpfulness', weight=0.4, description=(
        'Does the summary tell a shopper what they need to decide: the main praises and '
        'complaints across the Amazon product reviews, and how common each is?')),
    Criterion(name='factuality', weight=0.4, description=(
        'Is every statement supported by the reviews, with no invented features, numbers '
        'or opinions and no misrepresented consensus?')),
    Criterion(name='clarity', weight=0.2, description=(
        'Is the summary concise, well organised and easy to read?')),
))
RUBRICS = {'amazon_summary': AMAZON_SUMMARY_RUBRIC}


@register_factory('rubric', timeout=300.0, concurrency=8)
def rubric_reward(*, rubric, judge: Mapping | None = None, chat: Callable | None = None):
  """Reward = the rubric score in [0, 1] of each completion as a response to
  its prompt. `rubric`: a RubricSpec, its dict form, or a name in RUBRICS;
  `judge`: JudgeSpec fields overriding the rubric's; `chat`: a backend to use
  instead of the one the judge spec names. Stats: 'criterion/{name}' (mean
  raw score), 'attempts' and 'gated' (fraction capped by a gate)."""
  if isinstance(rubric, str):
    if rubric not in RUBRICS:
      raise ValueError(f'rubric {rubric!r} is not a known rubric; known: {sorted(RUBRICS)}; '
                       'or pass the rubric dict.')
    rubric = RUBRICS[rubric]
  spec = rubric if isinstance(rubric, RubricSpec) else RubricSpec.from_dict(rubric)
  if judge:
    _check_keys('rubric judge', judge, [f.name for f in dataclasses.fields(JudgeSpec)])
    spec = dataclasses.replace(spec, judge=dataclasses.replace(spec.judge, **judge))
  chat = chat or make_chat(spec.judge)

  def reward(prompt: str, completion: str, row) -> Scored:
    result = judge_rubric(spec, chat, prompt, completion)
    if result.score is None:
      raise RewardFailure(result.failure, f'no valid judge reply after {result.attempts} '
                          'attempts')
    gated = any(result.scores[g.criterion] < g.below for g in spec.gates)
    stats = {f'criterion/{name}': value for name, value in result.scores.items()}
    return Scored(result.score, stats | {'attempts': result.attempts, 'gated': float(gated)})
  return reward
