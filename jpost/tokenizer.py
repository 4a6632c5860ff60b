"""Tokenizer: HF `tokenizers` for text, jinja2 for chat templates, and the
token spans of every chat message (what loss masks are built from).

Loads a directory holding `tokenizer.json` (+ `tokenizer_config.json`,
`chat_template.jinja`, `generation_config.json` when present) without
importing transformers; renders chat templates exactly as transformers'
`apply_chat_template(tokenize=False)` does.

Message spans (`encode_chat`) work for any template, including templates
without `{% generation %}` markers and templates that rewrite content
(Llama 3 trims it; Qwen3 drops the reasoning of earlier assistant turns and
inserts an empty think block before the last one):

1. The conversation is rendered again with each message's content replaced
   by a unique sentinel. The text between sentinels is the template's
   "skeleton": piece 0 (before the first content), piece i (between content
   i-1 and i), piece n (after the last content, e.g. the generation prompt).
2. The pieces are found in order in the real rendering; the content of
   message i is the text between piece i and piece i+1, as printed (trimmed
   or otherwise cut down by the template). It must be a substring of the
   message's content; anything else (a template that rewrites content or
   renders it out of order) is an error, never a guessed span.
3. The end-of-turn (eot) token of message i is the special token that starts
   piece i+1, after optional whitespace. Message i's region ends after that
   token and the whitespace following it (`<|im_end|>\\n`); without one it
   ends where its content ends. The region of message 0 starts after the last
   end-of-turn token (or a leading bos token) in piece 0, so text the template
   puts before the first message (a default system prompt) is a prefix
   outside every span, as is the generation prompt after the last message.
4. Character positions become token indices with the encoding's offsets: a
   token belongs to the span that contains its first character. A token
   that straddles a boundary (e.g. "\\n " where the content starts with two
   spaces after a newline header) therefore belongs wholly to one side.

Fields other than 'content' (tool_calls, reasoning_content, ...) reach the
template but are part of the skeleton, not of the content span.

Special (control) tokens come from the template alone: one typed inside a
message's content is encoded as its plain text (`_typed_specials_as_text`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import pathlib
from typing import Any, Sequence

import jinja2
import tokenizers

from jpost import chat_template
from jpost.errors import ConfigError, MissingPathError

# transformers passes these named special tokens to every chat template.
_NAMED_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token',
                 'pad_token', 'cls_token', 'mask_token')
_SENTINEL = '@@jpost-content-{}@@'


@dataclasses.dataclass(frozen=True, kw_only=True)
class MessageSpan:
  """Token ranges of one message (half-open, indices into ChatEncoding.ids)."""

  role: str
  index: int  # position of the message in the conversation
  start: int  # whole region: header + content + end-of-turn markup
  end: int
  content_start: int  # the content as the template printed it
  content_end: int
  # The end-of-turn special token closing the message (e.g. <|im_end|>); a
  # template may put whitespace between content_end and it.
  eot: int | None
  # Where an assistant's output starts: the end of the generation prompt the
  # template renders for the messages before it. Text the template puts
  # between that prompt and the content (Qwen3's <think> block, from
  # reasoning_content or empty) is output the model writes, so it is a
  # target; content_start where the prompt is not a prefix of the rendering.
  output_start: int


class ChatSpanError(ValueError):
  """The template renders a message's content so that its span cannot be
  found (a property of the conversation, so row encoders count it as a bad row)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatEncoding:
  ids: list[int]
  text: str
  spans: tuple[MessageSpan, ...]


# ----------------------------------------------------------------------------
# Loading.


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ConfigError(
        f'{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}. '
        'Fix or re-save the file.') from e


def _token_text(value: Any, *, field: str, source: str) -> str | None:
  """A special token given as a string or an AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get('content'), str):
    return value['content']
  raise ConfigError(
      f'{source}: {field} must be a string or a {{"content": ...}} dict, got {value!r}.')


def _chat_template(value: Any, *, source: str) -> str | None:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get('name'): t.get('template') for t in value if isinstance(t, dict)}
    if isinstance(named.get('default'), str):
      return named['default']
    raise ConfigError(
        f'{source}: chat_template lists templates {sorted(map(str, named))} but none '
        "named 'default'; add one or pass chat_template= to Tokenizer.from_dir.")
  raise ConfigError(f'{source}: chat_template must be a string or a list of '
                   f'{{"name", "template"}} dicts, got {type(value).__name__}.')


def _load_backend(path: pathlib.Path) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises bare Exception
    _read_json(path)  # says where, when the file is not JSON at all
    raise ConfigError(f'{path}: `tokenizers` could not load it: {e}') from e


def _generation_config(path: pathlib.Path) -> dict:
  """generation_config.json's contents ({} when there is none)."""
  if not path.is_file():
    return {}
  config = _read_json(path)
  if not isinstance(config, dict):
    raise ConfigError(f'{path}: must hold a JSON object, got {type(config).__name__}.')
  return config


def _generation_eos_ids(config: dict, *, source: str) -> tuple[int, ...]:
  value = config.get('eos_token_id')
  ids = [value] if isinstance(value, int) else value or []
  if not all(isinstance(i, int) for i in ids):
    raise ConfigError(f'{source}: generation_config.json eos_token_id must be an int or a '
                      f'list of ints, got {value!r}.')
  return tuple(ids)


class Tokenizer:
  """A `tokenizers.Tokenizer` with its special tokens and chat template."""

  def __init__(self, *, backend: tokenizers.Tokenizer, config: dict, source: str,
               chat_template: str | None, generation_config: dict | None = None):
    self._backend = backend
    self._config = dict(config)
    self._source = source
    self._chat_template = chat_template
    # The model's generation_config.json: its stop ids are read here, and the
    # HF export writes it back beside the weights (jpost.models.hf.save).
    self._generation_config = dict(generation_config or {})
    self._generation_eos_ids = _generation_eos_ids(self._generation_config, source=source)
    self._special = {}  # named special token -> text
    for name in _NAMED_TOKENS:
      text = _token_text(config.get(name), field=name, source=source)
      if text is not None and backend.token_to_id(text) is None:
        raise ConfigError(
            f'{source}: {name} {text!r} is not a token of the vocabulary; fix the '
            'field in tokenizer_config.json or add the token to tokenizer.json.')
      if text is not None:
        self._special[name] = text
    if 'eos_token' not in self._special and not self._generation_eos_ids:
      raise ConfigError(
          f'{source}: no eos_token in tokenizer_config.json and no eos_token_id in '
          'generation_config.json; set eos_token so generations can stop.')
    added = backend.get_added_tokens_decoder()
    # Longest first, so that a token wins over a shorter one it starts with.
    self._special_texts = tuple(sorted(
        {t.content for t in added.values() if t.special}, key=len, reverse=True))

  # -- construction ----------------------------------------------------------

  @classmethod
  def from_dir(cls, path: str | pathlib.Path, *,
               chat_template: str | None = None) -> Tokenizer:
    """Loads tokenizer.json, tokenizer_config.json, chat_template.jinja and
    generation_config.json from `path`; `chat_template` overrides the file's."""
    path = pathlib.Path(path)
    if not path.is_dir():
      raise MissingPathError(f'tokenizer directory {path} does not exist.')
    tokenizer_file = path / 'tokenizer.json'
    if not tokenizer_file.is_file():
      raise MissingPathError(
          f'{tokenizer_file} not found; jpost needs a fast-tokenizer tokenizer.json '
          '(transformers\' tokenizer.save_pretrained(dir) writes one).')
    backend = _load_backend(tokenizer_file)
    config_file = path / 'tokenizer_config.json'
    config = _read_json(config_file) if config_file.is_file() else {}
    if not isinstance(config, dict):
      raise ConfigError(f'{config_file}: must hold a JSON object, got {type(config).__name__}.')
    template = _chat_template(config.get('chat_template'), source=str(config_file))
    jinja_file = path / 'chat_template.jinja'
    if jinja_file.is_file():  # transformers gives this file precedence too
      template = jinja_file.read_text(encoding='utf-8')
    return cls(backend=backend, config=config, source=str(path),
               chat_template=chat_template if chat_template is not None else template,
               generation_config=_generation_config(path / 'generation_config.json'))

  @classmethod
  def from_contents(cls, tokenizer_json: dict, config: dict, *, source: str,
                    chat_template: str | None = None,
                    generation_config: dict | None = None) -> Tokenizer:
    """From parsed tokenizer.json / tokenizer_config.json contents (e.g. from
    `jpost.models.gguf_tokenizer.tokenizer_files_from_gguf`). `chat_template`
    defaults to the config's."""
    try:
      backend = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as e:  # tokenizers raises bare Exception on schema errors
      raise ConfigError(f'{source}: tokenizer.json could not be loaded by `tokenizers`: {e}') from e
    if chat_template is None:
      chat_template = _chat_template(config.get('chat_template'), source=source)
    return cls(backend=backend, config=config, source=source,
               chat_template=chat_template, generation_config=generation_config)

  @classmethod
  def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata."""
    import gguf
    from jpost.models.gguf_tokenizer import tokenizer_files_from_gguf
    path = pathlib.Path(path)
    if not path.is_file():
      raise MissingPathError(f'GGUF file {path} does not exist.')
    try:
      tokenizer_json, config = tokenizer_files_from_gguf(gguf.GGUFReader(path))
    except ValueError as e:
      raise ConfigError(f'{path}: {e}') from e
    return cls.from_contents(tokenizer_json, config, source=str(path))

  def with_chat_template(self, chat_template: str) -> Tokenizer:
    """The same tokenizer with another chat template."""
    other = Tokenizer(backend=self._backend, config=self._config, source=self._source,
                      chat_template=chat_template, generation_config=self._generation_config)
    if '_offsets_backend' in self.__dict__:  # share the copy; it is costly to build
      other.__dict__['_offsets_backend'] = self._offsets_backend
    return other

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    """Writes tokenizer.json and tokenizer_config.json (+ chat_template.jinja)
    that transformers' AutoTokenizer.from_pretrained(path) loads. Stop ids
    from generation_config.json are the model's: the model export writes that
    file (`generation_config`)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    self._backend.save(str(path / 'tokenizer.json'))
    config = {k: v for k, v in self._config.items() if k not in _NAMED_TOKENS}
    config |= self._special
    config.setdefault('tokenizer_class', 'PreTrainedTokenizerFast')
    config.pop('chat_template', None)
    jinja_file = path / 'chat_template.jinja'
    if self._chat_template is not None:
      # Both places: older transformers read the config, newer the .jinja file.
      config['chat_template'] = self._chat_template
      jinja_file.write_text(self._chat_template, encoding='utf-8')
    else:
      jinja_file.unlink(missing_ok=True)  # a stale one would shadow the config
    (path / 'tokenizer_config.json').write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')
    return path

  @property
  def generation_config(self) -> dict:
    """The model's generation_config.json read with the tokenizer ({} if none)."""
    return dict(self._generation_config)

  # -- vocabulary ------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (the model's embedding may be larger)."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def _named_id(self, name: str) -> int | None:
    text = self._special.get(name)
    return None if text is None else self._backend.token_to_id(text)

  @property
  def bos_id(self) -> int | None:
    return self._named_id('bos_token')

  @property
  def eos_id(self) -> int:
    """eos_token, else generation_config.json's first eos_token_id."""
    eos = self._named_id('eos_token')
    return self._generation_eos_ids[0] if eos is None else eos

  @property
  def pad_id(self) -> int:
    """pad_token, or eos_id when the config names none (see `pad_is_eos`).

    Padding is told apart by `segment_ids == 0`, never by comparing ids with
    pad_id: with pad == eos that would mask out the real end-of-turn tokens.
    """
    pad = self._named_id('pad_token')
    return self.eos_id if pad is None else pad

  @property
  def pad_is_eos(self) -> bool:
    return self.pad_id == self.eos_id

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    """eos, generation_config.json's eos ids, then the chat template's
    end-of-turn token when it can be detected (deduplicated, in that order)."""
    ids = [self.eos_id, *self._generation_eos_ids]
    eot = self._probe[0]
    if eot is not None:
      ids.append(self._backend.token_to_id(eot))
    return tuple(dict.fromkeys(ids))

  @property
  def chat_template(self) -> str | None:
    return self._chat_template

  def token_to_id(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._backend.id_to_token(token_id)

  # -- text ------------------------------------------------------------------

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  @functools.cached_property
  def _added_ids(self) -> frozenset[int]:
    return frozenset(self._backend.get_added_tokens_decoder())

  @functools.cached_property
  def _byte_of_char(self) -> dict[str, int] | None:
    """Byte-level BPE's character -> byte table (GPT-2's), when the
    vocabulary is byte-level; None otherwise."""
    decoder = json.loads(self._backend.to_str()).get('decoder') or {}
    kinds = {decoder.get('type')} | {d.get('type') for d in decoder.get('decoders') or ()}
    if 'ByteLevel' not in kinds:
      return None
    from jpost.models.gguf_tokenizer import byte_alphabet
    return {char: byte for byte, char in byte_alphabet().items()}

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one token stands for. A token may hold part of a UTF-8
    character (a Chinese character is often three tokens), which `decode`
    can only show as U+FFFD; OpenAI's logprobs report these bytes."""
    piece = self._backend.id_to_token(int(token_id))
    if piece is None:
      return b''
    if int(token_id) in self._added_ids:  # stored as its text, not as byte-level characters
      return piece.encode()
    table = self._byte_of_char
    if table and all(c in table for c in piece):
      return bytes(table[c] for c in piece)
    if len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>'):  # byte fallback
      try:
        return bytes([int(piece[3:5], 16)])
      except ValueError:
        pass
    return self._backend.decode([int(token_id)]).encode()

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """The text of `ids`. `clean_up_tokenization_spaces` is ignored, as recent
    transformers does for BPE: it deletes real spaces before punctuation."""
    return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  # -- chat ------------------------------------------------------------------

  def _render(self, messages: list[dict], add_generation_prompt: bool,
              template_kwargs: dict) -> str:
    if self._chat_template is None:
      raise ConfigError(
          f'{self._source} has no chat template; set "chat_template" in its '
          'tokenizer_config.json (or add chat_template.jinja), or pass one with '
          'Tokenizer.from_dir(..., chat_template=...) / tokenizer.with_chat_template(...).')
    try:
      template = chat_template.compile_template(self._chat_template)
    except jinja2.TemplateSyntaxError as e:
      raise ConfigError(
          f'chat template of {self._source}: syntax error at line {e.lineno}: {e.message}') from e
    variables = {**self._special, 'tools': None, 'documents': None, **template_kwargs,
                 'messages': [chat_template.template_message(m) for m in messages],
                 'add_generation_prompt': add_generation_prompt}
    try:
      return template.render(**variables)
    except jinja2.TemplateError as e:
      raise ConfigError(f'chat template of {self._source} failed: {e}') from e

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                          **template_kwargs) -> str:
    """The rendered conversation, as transformers' apply_chat_template(tokenize=False)."""
    messages = chat_template.validate_messages(messages)
    return self._render(messages, add_generation_prompt, template_kwargs)

  def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = False,
                  **template_kwargs) -> ChatEncoding:
    """Token ids of the rendered conversation and each message's spans
    (see the module docstring for how spans are found)."""
    messages = chat_template.validate_messages(messages)
    text = self._render(messages, add_generation_prompt, template_kwargs)
    sentinels = [_SENTINEL.format(i) for i in range(len(messages))]
    skeleton = self._render([dict(m, content=s) for m, s in zip(messages, sentinels)],
                            add_generation_prompt, template_kwargs)
    where = f'{self._source}: chat template'
    pieces = _skeleton_pieces(skeleton, sentinels, where=where)
    contents = _locate_contents(text, pieces, [m['content'] for m in messages], where=where)

    # Character regions, then token indices.
    eots, bounds = [], []  # eot (char, token text) per message; region end chars
    for (_, content_end), piece in zip(contents, pieces[1:]):
      gap = len(piece) - len(piece.lstrip())
      token = self._special_prefix(piece[gap:])
      if token is None:
        eots.append(None)
        bounds.append(content_end)
      else:
        eots.append((content_end + gap, token))
        after = piece[gap + len(token):]
        bounds.append(content_end + gap + len(token) + len(after) - len(after.lstrip()))
    first = self._first_region_start(pieces[0], {e[1] for e in eots if e})

    ids, starts = self.encode_with_offsets(text)
    ids, starts = self._typed_specials_as_text(ids, starts, contents)
    def index(char: int) -> int:
      return bisect.bisect_left(starts, char)
    spans = []
    for i, message in enumerate(messages):
      eot = None
      if eots[i] is not None:
        char, token = eots[i]
        eot = index(char)
        if eot >= len(ids) or starts[eot] != char or ids[eot] != self.token_to_id(token):
          raise ConfigError(
              f'{where}: the end-of-turn token {token!r} of message {i} did not '
              'encode as one token; the tokenizer splits it, so spans cannot be mapped.')
      start = index(first if i == 0 else bounds[i - 1])
      content_start = index(contents[i][0])
      output = self._output_start(messages, i, text, template_kwargs,
                                  lo=first if i == 0 else bounds[i - 1], hi=contents[i][0])
      spans.append(MessageSpan(
          role=message['role'], index=i, start=start, end=index(bounds[i]),
          content_start=content_start, content_end=index(contents[i][1]), eot=eot,
          output_start=content_start if output is None else index(output)))
    return ChatEncoding(ids=ids, text=text, spans=tuple(spans))

  def _output_start(self, messages: list[dict], i: int, text: str, template_kwargs: dict,
                    *, lo: int, hi: int) -> int | None:
    """The character where assistant message i's output starts: the length of
    the rendering of messages[:i] with the generation prompt, when that is a
    prefix of `text` ending inside message i's header (between lo and hi)."""
    if i == 0 or messages[i]['role'] != 'assistant':
      return None
    try:
      prompt = self._render(messages[:i], True, template_kwargs)
    except ConfigError:  # a template that refuses the shorter conversation
      return None
    return len(prompt) if lo <= len(prompt) <= hi and text.startswith(prompt) else None

  # -- span helpers ----------------------------------------------------------

  @functools.cached_property
  def _special_ids(self) -> frozenset[int]:
    return frozenset(self._backend.token_to_id(t) for t in self._special_texts)

  @functools.cached_property
  def _plain_backend(self) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer.from_str(self._offsets_backend.to_str())
    backend.encode_special_tokens = True  # '<|im_end|>' is text, not a token
    return backend

  def _typed_specials_as_text(self, ids: list[int], starts: list[int],
                              contents: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Special tokens typed inside a message's content, encoded as the text
    they are. Otherwise a user (or a data row, or a request to the server)
    writing '<|im_end|><|im_start|>assistant' inside a message forges a turn
    the template never rendered; transformers' apply_chat_template(tokenize=True)
    would parse them. Control tokens come from the template only."""
    if self._special_ids.isdisjoint(ids):
      return ids, starts
    out_ids, out_starts = [], []
    for token, start in zip(ids, starts):
      if token in self._special_ids and any(a <= start < b for a, b in contents):
        encoding = self._plain_backend.encode(self._backend.id_to_token(token),
                                              add_special_tokens=False)
        out_ids += encoding.ids
        out_starts += [start + begin for begin, _ in encoding.offsets]
      else:
        out_ids.append(token)
        out_starts.append(start)
    return out_ids, out_starts

  def _special_prefix(self, text: str) -> str | None:
    """The special token `text` starts with, if any."""
    return next((t for t in self._special_texts if text.startswith(t)), None)

  def _first_region_start(self, piece: str, eot_tokens: set[str]) -> int:
    """Where message 0's region starts inside piece 0: after the last
    end-of-turn token (+ whitespace) there, else after a leading bos token
    unless bos is also the token that opens every turn (SmolLM2's <|im_start|>)."""
    cut = max((piece.rfind(t) + len(t) for t in eot_tokens if t in piece), default=-1)
    if cut >= 0:
      return cut + len(piece[cut:]) - len(piece[cut:].lstrip())
    bos = self._special.get('bos_token')
    if bos and piece.startswith(bos) and bos != self._probe[1]:
      return len(bos)
    return 0

  @functools.cached_property
  def _offsets_backend(self) -> tokenizers.Tokenizer:
    # Post-processors only add special tokens (off here) and may trim the
    # offsets of tokens with leading/trailing spaces, which would move
    # boundary tokens to the wrong span; without one the offsets are exact.
    backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
    backend.post_processor = None
    return backend

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, start character of each token) of `text`, without special tokens."""
    encoding = self._offsets_backend.encode(text, add_special_tokens=False)
    starts = [start for start, _ in encoding.offsets]
    if encoding.ids != self.encode(text) or starts != sorted(starts):
      raise ConfigError(
          f'{self._source}: token offsets are not usable for spans (ids differ '
          'without the post-processor, or offsets go backwards).')
    return encoding.ids, starts

  @functools.cached_property
  def _probe(self) -> tuple[str | None, str | None]:
    """(end-of-turn token after an assistant message, token opening the
    assistant header) of the template, from a user + assistant skeleton;
    (None, None) when the template rejects that conversation."""
    if self._chat_template is None:
      return None, None
    sentinels = [_SENTINEL.format(0), _SENTINEL.format(1)]
    try:
      skeleton = self._render([{'role': 'user', 'content': sentinels[0]},
                               {'role': 'assistant', 'content': sentinels[1]}], False, {})
      _, between, after = _skeleton_pieces(skeleton, sentinels, where='probe')
    except ValueError:
      return None, None
    header = between.lstrip()
    user_eot = self._special_prefix(header)
    if user_eot is not None:
      header = header[len(user_eot):].lstrip()
    return self._special_prefix(after.lstrip()), self._special_prefix(header)


def _skeleton_pieces(skeleton: str, sentinels: list[str], *, where: str) -> list[str]:
  """The text before, between and after the sentinels."""
  pieces, cursor = [], 0
  for i, sentinel in enumerate(sentinels):
    count = skeleton.count(sentinel)
    if count != 1:
      raise ConfigError(
          f'{where} prints the content of message {i} {count} times (expected once, '
          'unchanged); it drops, repeats or rewrites contents, so jpost cannot tell '
          'which tokens are the content.')
    at = skeleton.find(sentinel)
    if at < cursor:
      raise ConfigError(
          f'{where} prints message {i} before message {i - 1}; spans need the '
          'messages in conversation order.')
    pieces.append(skeleton[cursor:at])
    cursor = at + len(sentinel)
  pieces.append(skeleton[cursor:])
  return pieces


def _locate_contents(text: str, pieces: list[str], contents: list[str], *,
                     where: str) -> list[tuple[int, int]]:
  """(start, end) characters of each message's printed content in `text`."""
  def error(detail: str) -> ChatSpanError:
    return ChatSpanError(
        f'{where}: cannot locate the message contents: {detail}. The template renders '
        'a message differently from the same message with other content (Qwen3, for '
        'one, moves the <think> reasoning of the last assistant turn out of its '
        'content), so jpost cannot tell which tokens are the content; change the '
        'message or the template (give reasoning as the message\'s reasoning_content).')
  def missing(i: int, piece: str) -> ChatSpanError:
    place = ('before message 0' if i == 0 else 'after the last message'
             if i == len(contents) else f'between messages {i - 1} and {i}')
    return error(f'the template text {piece[:80]!r} {place} is not in the rendering')
  if not text.startswith(pieces[0]):
    raise missing(0, pieces[0])
  cursor, found, last = len(pieces[0]), [], len(contents) - 1
  for i, content in enumerate(contents):
    after = pieces[i + 1]
    if text.startswith(content + after, cursor) and (
        i < last or cursor + len(content) + len(after) == len(text)):
      end = cursor + len(content)  # printed verbatim: no search, no ambiguity
    else:
      if after in content:
        raise error(f'message {i}: it contains the template text {after!r} that follows it')
      if i == last:  # the last piece ends the rendering
        end = len(text) - len(after) if text.endswith(after) else -1
      else:
        end = text.find(after, cursor)
      if end < cursor:
        raise missing(i + 1, after)
      if text[cursor:end] not in content:
        raise error(f'message {i}: the template printed {text[cursor:end][:60]!r}, '
                    'which is not part of the message content')
    found.append((cursor, end))
    cursor = end + len(after)
  return found
