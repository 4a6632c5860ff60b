"""Evaluate models on held-out prompts: verifier accuracy, pass@k / maj@k,
an optional rubric judge, pairwise battles and a leaderboard, in a report.

  python -m jpost.main --config=configs/eval.py --workdir=runs/eval \\
      --config.models='{"smollm2": "smollm2-135m-instruct", "grpo": "runs/demo/hf"}'
  python -m jpost.main --config=configs/eval.py:tiny --workdir=runs/eval_tiny

`models` maps a name to a checkpoint directory, an embedded name or a
`completions_NAME.jsonl` written by an earlier eval (no sampling again).
`anchor` names the model rated 1000 on the leaderboard. `pairwise.judge`:
'verifier' (ground truth decides each battle), 'endpoint' (an
OpenAI-compatible LLM judge, asked twice with positions swapped) or 'none'.
`rerank.prm` / `rerank.reward_model` (checkpoint dirs) add best-of-n
reranking of the samples next to majority vote and pass@n. `rubric.name`
('amazon_summary' or '') adds a point-wise rubric judge whose
`rubric.judge` fields (endpoint, model, ...) say who judges.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'eval'
  c.seed = 0
  # Processes sample shares of the prompts (README, "Many processes and hosts").
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, heartbeat_timeout_s=100, init_timeout_s=300))
  c.title = 'jpost evaluation'
  c.models = ml_collections.ConfigDict({'smollm2': 'smollm2-135m-instruct',
                                        'grpo': 'runs/demo/hf'})  # `make demo`'s
  c.anchor = 'smollm2'  # rated 1000 on the leaderboard; '' = the first name in sorted order
  c.model = ml_collections.ConfigDict(dict(path='', dtype='float32', param_dtype='float32'))
  c.data = ml_collections.ConfigDict(dict(eval=('arith:test',), max_prompt_len=64,
                                          policy='error'))
  c.batch_size = 16
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=64, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, num_samples=4,
      scan_layers=config_dict.placeholder(bool)))  # None: see SamplingConfig
  c.rewards = ml_collections.ConfigDict({'math': {'weight': 1.0}})  # the ground-truth verifier
  c.answer_key = 'answer'
  c.rubric = ml_collections.ConfigDict(dict(name='', judge={'endpoint': '', 'model': ''}))
  c.pairwise = ml_collections.ConfigDict(dict(
      judge='verifier', endpoint='', model='', retries=2, bootstrap_rounds=200))
  # Forgetting check (README, "Forgetting check"), two halves against the anchor:
  # NLL on general text ('pydoc': Python's own help topics, or a .txt file;
  # chunks=0 turns it off), and general instructions ('builtin': 24 kept in the
  # repo, or a prompt file; '' turns it off) answered by each model and judged
  # against the anchor's answers: judge='likelihood' (a local model's verdict
  # probabilities in both orders, position bias cancelled; judge_model '' = the
  # anchor itself; |margin| <= `margin` nats is a tie), 'endpoint' (an
  # OpenAI-compatible LLM at endpoint/model), 'reward_model' (judge_model = a
  # reward model directory) or 'none'.
  c.general = ml_collections.ConfigDict(dict(
      text='pydoc', chunks=32, tokens=256, bootstrap_rounds=1000,
      instructions='builtin', max_new_tokens=128, judge='likelihood', judge_model='',
      margin=0.05, endpoint='', model='', retries=1))
  # Best-of-n over the samples: a process reward model (configs/prm.py's export)
  # with each step aggregate, and/or an outcome reward model; '' = off. The
  # separator '' is the one the PRM was trained with.
  c.rerank = ml_collections.ConfigDict(dict(
      prm='', aggregates=('min', 'last', 'mean', 'product'), separator='', reward_model=''))
  c.report_examples = 8
  if arg == 'tiny':
    c.anchor = ''
    c.batch_size = 8
    c.sampling.max_new_tokens = 8
    c.sampling.num_samples = 2
    c.pairwise.bootstrap_rounds = 20
    c.report_examples = 2
    c.general.chunks, c.general.tokens = 4, 32
    c.general.max_new_tokens = 8
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
