"""Rebuilds a HF `tokenizer.json` + `tokenizer_config.json` from GGUF metadata.

A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary,
merges, token types, special ids and a pre-tokenizer *name*
(`tokenizer.ggml.pre`). The name matters: it picks how text is split before
BPE, and a wrong split gives different ids for the same text with no error.
transformers' GGUF converter falls back to plain GPT-2 splitting for names it
does not know (SmolLM2's 'smollm' among them), which differs from SmolLM2's
real tokenizer on whitespace before digits ("x =  12", "\\n\\n1"). Here every
supported name maps to the pre-tokenizer of the model's original HF tokenizer,
and unknown names are an error.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == 'gpt2'`) are
supported; SentencePiece ('llama') and others raise.
"""

from __future__ import annotations

import functools

# llama.cpp's token types (gguf.TokenType): control tokens are special added
# tokens (<|im_end|>), user-defined ones are added but not special (<think>).
_CONTROL = 3
_USER_DEFINED = 4

_GPT2_BYTE_LEVEL = {'type': 'ByteLevel', 'add_prefix_space': False,
                    'trim_offsets': True, 'use_regex': True}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str, *, trim_offsets: bool) -> dict:
  return {'type': 'Sequence', 'pretokenizers': [
      {'type': 'Split', 'pattern': {'Regex': regex}, 'behavior': 'Isolated',
       'invert': False},
      {'type': 'ByteLevel', 'add_prefix_space': False,
       'trim_offsets': trim_offsets, 'use_regex': False}]}


@functools.cache
def _families() -> dict[str, dict]:
  """Pre-tokenizer family -> the normalizer / pre-tokenizer / BPE flags of the
  original HF tokenizer.json of models in that family."""
  return {
      # GPT-2 regex inside ByteLevel.
      'gpt2': dict(normalizer=None, pre_tokenizer=_GPT2_BYTE_LEVEL,
                   ignore_merges=False),
      # SmolLM/StarCoder: every digit alone first, then the GPT-2 regex
      # (llama.cpp: regexes "\p{N}" then GPT-2's).
      'digits-gpt2': dict(
          normalizer=None, ignore_merges=False,
          pre_tokenizer={'type': 'Sequence', 'pretokenizers': [
              {'type': 'Digits', 'individual_digits': True}, _GPT2_BYTE_LEVEL]}),
      # Qwen2/2.5/3 tokenizer.json: NFC, then the Qwen regex.
      'qwen2': dict(normalizer={'type': 'NFC'}, ignore_merges=False,
                    pre_tokenizer=_split_then_bytes(_QWEN2_SPLIT, trim_offsets=False)),
      # Llama 3 tokenizer.json (tiktoken-style: whole words in the vocab win).
      'llama3': dict(normalizer=None, ignore_merges=True,
                     pre_tokenizer=_split_then_bytes(_LLAMA3_SPLIT, trim_offsets=True)),
  }


# `tokenizer.ggml.pre` -> family. Names as llama.cpp's convert_hf_to_gguf.py
# writes them.
PRE_TOKENIZERS = {
    'gpt2': 'gpt2',
    'smollm': 'digits-gpt2',
    'starcoder': 'digits-gpt2',
    'refact': 'digits-gpt2',
    'qwen2': 'qwen2',
    'llama-bpe': 'llama3',
    'llama3': 'llama3',
    'llama-v3': 'llama3',
}


@functools.cache
def byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table (as in `tokenizers`' ByteLevel)."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _field(reader, key: str, default=None, *, required: bool = False):
  """A metadata value as a Python str / int / bool / float / list."""
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise ValueError(
          f'GGUF metadata key {key!r} is missing; this file has no usable '
          'tokenizer. Load the model from an HF directory with tokenizer.json instead.')
    return default
  return field.contents()


def _special_id(reader, key: str, tokens: list[str]) -> int | None:
  value = _field(reader, f'tokenizer.ggml.{key}')
  if value is None:
    return None
  if not 0 <= int(value) < len(tokens):
    raise ValueError(
        f'GGUF tokenizer.ggml.{key} = {value} is outside the vocabulary '
        f'(0..{len(tokens) - 1}); the file is inconsistent.')
  return int(value)


def _vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
  alphabet = byte_alphabet()
  letters = set(alphabet.values())
  vocab = {}
  for i, (token, kind) in enumerate(zip(tokens, types)):
    # Added tokens keep their text as the vocab key so `tokenizers` maps the
    # added token onto this id instead of appending a new one. Other tokens
    # that llama.cpp stored as raw text are respelled in the byte alphabet.
    if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= letters:
      token = ''.join(alphabet[b] for b in token.encode('utf-8'))
    if token in vocab:
      raise ValueError(
          f'GGUF vocabulary lists token {token!r} twice (ids {vocab[token]} and {i}); '
          'a tokenizer.json cannot represent that. Use the HF tokenizer.json instead.')
    vocab[token] = i
  return vocab


def _merges(merges: list[str]) -> list[list[str]]:
  pairs = []
  for i, merge in enumerate(merges):
    parts = merge.split(' ')
    if len(parts) != 2:
      raise ValueError(
          f'GGUF tokenizer.ggml.merges[{i}] = {merge!r} is not "left right"; '
          'the file is malformed.')
    pairs.append(parts)
  return pairs


def _post_processor(add_bos: bool, add_eos: bool, bos: str | None,
                    eos: str | None, ids: dict[str, int]) -> dict:
  byte_level = {'type': 'ByteLevel', 'add_prefix_space': True,
                'trim_offsets': False, 'use_regex': True}
  if not (add_bos or add_eos):
    return byte_level
  for flag, name, token in ((add_bos, 'bos', bos), (add_eos, 'eos', eos)):
    if flag and token is None:
      raise ValueError(
          f'GGUF sets tokenizer.ggml.add_{name}_token but has no '
          f'tokenizer.ggml.{name}_token_id; the file is inconsistent.')
  head = [{'SpecialToken': {'id': bos, 'type_id': 0}}] if add_bos else []
  tail = [{'SpecialToken': {'id': eos, 'type_id': 0}}] if add_eos else []
  used = [t for t, flag in ((bos, add_bos), (eos, add_eos)) if flag]
  template = {
      'type': 'TemplateProcessing',
      'single': head + [{'Sequence': {'id': 'A', 'type_id': 0}}] + tail,
      'pair': (head + [{'Sequence': {'id': 'A', 'type_id': 0}}] + tail
               + head + [{'Sequence': {'id': 'B', 'type_id': 1}}] + tail),
      'special_tokens': {t: {'id': t, 'ids': [ids[t]], 'tokens': [t]} for t in used},
  }
  return {'type': 'Sequence', 'processors': [byte_level, template]}


def tokenizer_files_from_gguf(reader) -> tuple[dict, dict]:
  """(tokenizer.json content, tokenizer_config.json content) of a GGUF.

  `reader` is a `gguf.GGUFReader`. The result loads with `tokenizers`,
  `jpost.tokenizer.Tokenizer` and transformers' `AutoTokenizer`.
  """
  model = _field(reader, 'tokenizer.ggml.model', required=True)
  if model != 'gpt2':
    raise ValueError(
        f'GGUF tokenizer.ggml.model is {model!r}; jpost converts only byte-level '
        "BPE ('gpt2') vocabularies. Load the model from its HF directory "
        '(tokenizer.json) instead.')
  # Files written before llama.cpp recorded the pre-tokenizer meant GPT-2's.
  pre = _field(reader, 'tokenizer.ggml.pre', 'gpt2')
  if pre not in PRE_TOKENIZERS:
    raise ValueError(
        f'GGUF tokenizer.ggml.pre is {pre!r}, which jpost does not know how to '
        f'split text for (known: {sorted(PRE_TOKENIZERS)}). Guessing would give '
        "silently different token ids; load the model's HF tokenizer.json instead, "
        'or add the pre-tokenizer to jpost.models.gguf_tokenizer.PRE_TOKENIZERS.')
  family = _families()[PRE_TOKENIZERS[pre]]

  tokens = list(_field(reader, 'tokenizer.ggml.tokens', required=True))
  types = list(_field(reader, 'tokenizer.ggml.token_type', [1] * len(tokens)))
  if len(types) != len(tokens):
    raise ValueError(
        f'GGUF has {len(tokens)} tokens but {len(types)} token types; the file is malformed.')
  merges = _merges(list(_field(reader, 'tokenizer.ggml.merges', required=True)))
  vocab = _vocab(tokens, types)

  special = {name: _special_id(reader, key, tokens) for name, key in (
      ('bos', 'bos_token_id'), ('eos', 'eos_token_id'),
      ('unk', 'unknown_token_id'), ('pad', 'padding_token_id'))}
  text = {name: None if i is None else tokens[i] for name, i in special.items()}
  add_bos = bool(_field(reader, 'tokenizer.ggml.add_bos_token', False))
  add_eos = bool(_field(reader, 'tokenizer.ggml.add_eos_token', False))

  added = [{'id': i, 'content': token, 'single_word': False, 'lstrip': False,
            'rstrip': False, 'normalized': False, 'special': kind == _CONTROL}
           for i, (token, kind) in enumerate(zip(tokens, types))
           if kind in (_CONTROL, _USER_DEFINED)]
  tokenizer_json = {
      'version': '1.0',
      'truncation': None,
      'padding': None,
      'added_tokens': added,
      'normalizer': family['normalizer'],
      'pre_tokenizer': family['pre_tokenizer'],
      'post_processor': _post_processor(add_bos, add_eos, text['bos'], text['eos'], vocab),
      'decoder': {'type': 'ByteLevel', 'add_prefix_space': True,
                  'trim_offsets': True, 'use_regex': True},
      'model': {'type': 'BPE', 'dropout': None, 'unk_token': None,
                'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                'fuse_unk': False, 'byte_fallback': False,
                'ignore_merges': family['ignore_merges'],
                'vocab': vocab, 'merges': merges},
  }

  config = {
      # transformers loads this class straight from tokenizer.json; a model
      # specific class could rebuild its own pre-tokenizer over ours.
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'add_bos_token': add_bos,
      'add_eos_token': add_eos,
      'bos_token': text['bos'],
      'eos_token': text['eos'],
      'unk_token': text['unk'],
      'pad_token': text['pad'],
      'clean_up_tokenization_spaces': False,
  }
  arch = _field(reader, 'general.architecture')
  context = _field(reader, f'{arch}.context_length') if arch else None
  if context is not None:
    config['model_max_length'] = int(context)
  template = _field(reader, 'tokenizer.chat_template')
  if template is not None:
    config['chat_template'] = template
  return tokenizer_json, config
