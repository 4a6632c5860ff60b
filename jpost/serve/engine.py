"""The scheduler: one running decode batch of fixed slots per served model.

Continuous batching: between two decode steps, waiting requests whose
choices fit in the free slots are prefilled and joined (programs.join); a
choice leaves the batch when it stops (stop token, stop string, max_tokens,
or its client went away) and its slot is free for the next step. Static
batching, for comparison: requests join only when the whole batch is idle,
and only once it can be filled or the oldest has waited `static_wait_s`;
the batch then runs until its last choice ends.

The engine runs in its own thread (device calls block); callers submit a
Request and receive Events through the request's `emit` callback, called
from the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from typing import Callable

import jax
import numpy as np

from jpost.serve import programs, text as text_lib

MODES = ('continuous', 'static')


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  slots: int = 8  # rows of the running decode batch
  cache_len: int = 1024  # prompt + new tokens of one choice at most
  mode: str = 'continuous'
  static_wait_s: float = 0.05  # static mode: the longest a partial batch waits to start
  max_waiting: int = 256  # requests queued beyond the running ones; more are refused

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'engine mode {self.mode!r} is not one of {MODES}.')
    if self.slots < 1 or self.cache_len < 2:
      raise ValueError(f'slots ({self.slots}) must be >= 1 and cache_len ({self.cache_len}) >= 2.')


@dataclasses.dataclass(frozen=True)
class TokenInfo:
  id: int
  data: bytes  # the token's bytes: at times part of a UTF-8 character
  logprob: float
  top: tuple[tuple[bytes, float], ...]  # (token bytes, log-prob), most likely first


@dataclasses.dataclass(frozen=True)
class Delta:
  """New text of one choice, and the tokens it came from."""
  choice: int
  text: str
  tokens: tuple[TokenInfo, ...]


@dataclasses.dataclass(frozen=True)
class ChoiceEnd:
  choice: int
  finish_reason: str  # 'stop' or 'length'
  completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failure:
  message: str


Event = Delta | ChoiceEnd | Failure


class QueueFull(Exception):
  """More requests than the engine may hold."""


@dataclasses.dataclass(kw_only=True, eq=False)
class Request:
  prompt_ids: list[int]
  max_tokens: int
  emit: Callable[[Event], None]
  n: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  top_logprobs: int = 0
  logprobs: bool = False
  cancelled: bool = False  # set by the caller when its client goes away
  submitted: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(eq=False)
class _Choice:
  """One completion being decoded in a slot."""
  request: Request
  index: int
  slot: int
  ids: list = dataclasses.field(default_factory=list)  # generated, stop token excluded
  pending: list = dataclasses.field(default_factory=list)  # TokenInfo not yet sent with text
  sent: int = 0  # characters of the text already sent
  count: int = 0  # tokens generated, stop token included
  seed: int = 0  # of this choice's sampling keys


class Engine:
  """Serves one model; `start()` compiles the decode step and starts the thread."""

  def __init__(self, model, tokenizer, config: EngineConfig):
    limit = model.config.max_position_embeddings
    if config.cache_len > limit:
      raise ValueError(f'cache_len {config.cache_len} exceeds the model context ({limit}); '
                       'lower it.')
    self.config = config
    self.tokenizer = tokenizer
    self.stop_ids = frozenset(tokenizer.stop_ids)
    self.model_config = model.config
    self.buckets = programs.prefill_buckets(config.cache_len)
    self._graphdef, self._state, self._layers, self._head = programs.split_model(model)
    slots = config.slots
    self._cache = programs.empty_cache(model.config, slots, config.cache_len)
    self._hidden = jax.numpy.zeros((slots, model.config.hidden_size), model.config.dtype)
    self._pos = jax.numpy.zeros((slots,), jax.numpy.int32)
    self._column = 0
    self._slots: list[_Choice | None] = [None] * slots
    self._waiting: collections.deque[Request] = collections.deque()
    self._lock = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self._rng = random.Random()
    self.counters = collections.Counter({name: 0 for name in (
        'requests_submitted', 'requests_started', 'requests_cancelled', 'choices_finished',
        'prompt_tokens', 'completion_tokens', 'decode_steps')})

  # -- caller side (any thread) ----------------------------------------------

  def submit(self, request: Request) -> None:
    """Queues a request; raises QueueFull or ValueError (it cannot fit)."""
    if request.n > self.config.slots:
      raise ValueError(f'n={request.n} is more than the {self.config.slots} slots this model has.')
    if len(request.prompt_ids) + request.max_tokens > self.config.cache_len:
      raise ValueError(f'prompt of {len(request.prompt_ids)} tokens + max_tokens '
                       f'{request.max_tokens} exceeds the context of {self.config.cache_len}.')
    with self._lock:
      if len(self._waiting) >= self.config.max_waiting:
        raise QueueFull(f'{len(self._waiting)} requests are already waiting.')
      self._waiting.append(request)
      self.counters['requests_submitted'] += 1
      self._lock.notify()

  def wake(self) -> None:
    """Lets the thread see a cancellation now rather than at its next wait."""
    with self._lock:
      self._lock.notify()

  def metrics(self) -> dict:
    with self._lock:
      busy = sum(c is not None for c in self._slots)
      return {'mode': self.config.mode, 'slots': self.config.slots, 'slots_busy': busy,
              'requests_waiting': len(self._waiting),
              'requests_running': len({id(c.request) for c in self._slots if c is not None}),
              'cache_len': self.config.cache_len, **dict(self.counters)}

  def start(self) -> 'Engine':
    self._run_step(np.zeros(self.config.slots, np.int32), with_top=False)  # compile now
    self._thread = threading.Thread(target=self._loop, name='jpost-engine', daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._lock:
      self._stopping = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout=30)

  # -- engine thread ---------------------------------------------------------

  def _loop(self):
    while True:
      with self._lock:
        if self._stopping:
          return
        self._drop_cancelled()
        admitted = self._admissible()
        if not admitted and not any(self._slots):
          self._lock.wait(timeout=self._idle_wait())
          continue
      joining = collections.deque(admitted)  # out of the queue, not yet all in slots
      try:
        while joining:
          self._join(joining[0])
          joining.popleft()
        if any(self._slots):
          self._decode_step()
      except Exception as e:  # a failing step must not take the server down
        logging.exception('serving step failed')
        self._fail_running(f'the model failed: {e}', joining=joining)

  def _idle_wait(self) -> float:
    if self.config.mode == 'static' and self._waiting:
      return self.config.static_wait_s
    return 1.0

  def _free_slots(self) -> list[int]:
    return [i for i, c in enumerate(self._slots) if c is None]

  def _admissible(self) -> list[Request]:
    """Requests to join before the next step (removed from the queue)."""
    free = len(self._free_slots())
    if self.config.mode == 'static':
      if free < self.config.slots or not self._waiting:
        return []
      wanted = sum(r.n for r in self._waiting)
      waited = time.monotonic() - self._waiting[0].submitted
      if wanted < self.config.slots and waited < self.config.static_wait_s:
        return []
    admitted = []
    while self._waiting and self._waiting[0].n <= free:
      request = self._waiting.popleft()
      free -= request.n
      admitted.append(request)
    return admitted

  def _drop_cancelled(self):
    if any(r.cancelled for r in self._waiting):
      kept = [r for r in self._waiting if not r.cancelled]
      self.counters['requests_cancelled'] += len(self._waiting) - len(kept)
      self._waiting = collections.deque(kept)
    cancelled = {id(c.request) for c in self._slots if c is not None and c.request.cancelled}
    for i, choice in enumerate(self._slots):
      if choice is not None and choice.request.cancelled:
        self._slots[i] = None
    self.counters['requests_cancelled'] += len(cancelled)

  def _join(self, request: Request):
    """Prefills the prompt once and places it into a free slot per choice."""
    length = len(request.prompt_ids)
    bucket = programs.bucket_for(length, self.buckets)
    tokens = np.zeros((1, bucket), np.int32)
    mask = np.zeros((1, bucket), np.int32)
    tokens[0, bucket - length:] = request.prompt_ids
    mask[0, bucket - length:] = 1
    hidden, pos, cache = programs.prefill(self._graphdef, self._state, tokens, mask,
                                          programs.prompt_cache(self.model_config, bucket))
    # The prompt's last column lands right before the request's decode columns wrap around.
    start = (self._column + request.max_tokens + length - bucket) % self.config.cache_len
    seed = request.seed if request.seed is not None else self._rng.getrandbits(31)
    with self._lock:
      free = self._free_slots()
    for index in range(request.n):
      slot = free[index]
      self._cache, self._hidden, self._pos = programs.join(
          self._cache, self._hidden, self._pos, cache, hidden, pos, np.int32(slot),
          np.int32(start))
      # Each choice its own stream of keys.
      choice = _Choice(request, index, slot, seed=(seed + 7919 * index) % (2 ** 31))
      with self._lock:
        self._slots[slot] = choice
    self.counters['requests_started'] += 1
    self.counters['prompt_tokens'] += length

  def _settings(self):
    """Per-slot arrays for the step: active, temperature, top_p, (seed, count)."""
    slots = self.config.slots
    active = np.zeros(slots, np.int32)
    temperature = np.zeros(slots, np.float32)
    top_p = np.ones(slots, np.float32)
    seeds = np.zeros((slots, 2), np.int32)
    for i, choice in enumerate(self._slots):
      if choice is not None:
        active[i] = 1
        temperature[i] = choice.request.temperature
        top_p[i] = choice.request.top_p
        seeds[i] = (choice.seed, choice.count)
    return active, temperature, top_p, seeds

  def _run_step(self, active, temperature=None, top_p=None, seeds=None, *, with_top: bool):
    slots = self.config.slots
    temperature = np.zeros(slots, np.float32) if temperature is None else temperature
    top_p = np.ones(slots, np.float32) if top_p is None else top_p
    seeds = np.zeros((slots, 2), np.int32) if seeds is None else seeds
    token, logprob, top_ids, top_lps, self._hidden, self._pos, self._cache = programs.step(
        self._graphdef, self._state, self._layers, self._head, self._cache, self._hidden,
        self._pos, active, np.int32(self._column), temperature, top_p, seeds, with_top)
    self._column = (self._column + 1) % self.config.cache_len
    return jax.device_get((token, logprob, top_ids, top_lps))

  def _decode_step(self):
    with_top = any(c is not None and c.request.top_logprobs > 0 for c in self._slots)
    token, logprob, top_ids, top_lps = self._run_step(*self._settings(), with_top=with_top)
    self.counters['decode_steps'] += 1
    for slot, choice in enumerate(list(self._slots)):
      if choice is None:
        continue
      top = ()
      if choice.request.top_logprobs:
        k = choice.request.top_logprobs
        top = tuple((self.tokenizer.token_bytes(int(t)), float(lp))
                    for t, lp in zip(top_ids[slot, :k], top_lps[slot, :k]))
      self._advance(choice, int(token[slot]), float(logprob[slot]), top)

  def _advance(self, choice: _Choice, token: int, logprob: float, top):
    """Records one new token of a choice, sends what text it can, and frees
    the slot when the choice has ended."""
    request = choice.request
    choice.count += 1
    self.counters['completion_tokens'] += 1
    stopped = token in self.stop_ids
    if not stopped:
      choice.ids.append(token)
      if request.logprobs:
        choice.pending.append(TokenInfo(token, self.tokenizer.token_bytes(token), logprob, top))
    out_of_tokens = choice.count >= request.max_tokens
    full = self.tokenizer.decode(choice.ids)
    ready, hit_stop = text_lib.releasable(full, request.stop, final=stopped or out_of_tokens)
    if len(ready) > choice.sent or (choice.pending and (hit_stop or stopped or out_of_tokens)):
      request.emit(Delta(choice.index, ready[choice.sent:], tuple(choice.pending)))
      choice.sent, choice.pending = len(ready), []
    if stopped or hit_stop or out_of_tokens:
      reason = 'stop' if stopped or hit_stop else 'length'
      with self._lock:
        self._slots[choice.slot] = None
      request.emit(ChoiceEnd(choice.index, reason, choice.count))
      self.counters['choices_finished'] += 1

  def _fail_running(self, message: str, joining=()):
    """Ends every request in a slot, and those admitted but not yet placed
    (a prompt that failed to load, and the ones after it), with a Failure:
    each waiting client gets its error rather than waiting forever."""
    with self._lock:
      running = {id(c.request): c.request for c in self._slots if c is not None}
      self._slots = [None] * self.config.slots
    running |= {id(r): r for r in joining}
    for request in running.values():
      request.emit(Failure(message))
