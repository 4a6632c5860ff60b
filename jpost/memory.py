"""Memory a training step needs on each device, predicted from the model's
config and the batch's shape before anything is compiled or allocated
(`bench/plan.py --compile` sets XLA's own assignment beside it). Bytes, by part:

  params, grads: P x 4 / fsdp each (float32 master weights); optimizer:
      2 x P x 4 / fsdp (AdamW's moments); weight casts: P x 2 / fsdp (the
      compute-dtype copy a bfloat16 step reads);
  saved activations: what the remat policy keeps per layer, x layers;
  layer backward: one layer's recomputed activations and their gradients;
  attention: the score blocks alive at once (T x T materialised, T x block
      blockwise, block x block in blockwise self-attention, none for the
      Pallas kernel; cuDNN's backward workspace, which grows with
      `attention_max_segments`);
  LM head: one chunk of float32 logits (XLA reuses it for the gradient).

The constants (how many [tokens, D] / [tokens, F] buffers are alive) were
read off XLA's buffer assignment for the SFT step. A GRPO/PPO policy update
puts each prompt's tokens through the layers once and its completions'
tokens once per sample; the completions attend to prompt + completion keys,
and only completion positions reach the LM head. With remat 'full' the
prediction was within 15% of XLA's assignment for every shape measured, and
within 10% for all but one (README, "Attention and memory").
"""

from __future__ import annotations

from jpost.models import attention as attn
from jpost.models.config import ModelConfig


def _attention(cfg: ModelConfig, name: str, rows: float, queries: int, keys: int,
               self_attention: bool = False) -> float:
  """float32 scores, probabilities and their gradient of `rows` x `queries`
  attending to `keys` (blockwise: one key block's probabilities and gradient,
  for one query block in self-attention, which runs its queries in blocks
  too; a fused kernel keeps none); materialised ones times the layers when
  nothing recomputes them (the blockwise path recomputes its blocks in its
  own backward)."""
  if name in ('pallas', 'cpu'):  # fused: no scores leave the kernel
    return 0.0
  if name == 'cudnn':
    # No scores either, but cuDNN's backward takes a workspace of about 8
    # bytes (a float32 dQ accumulator, dK and dV over all query heads) per
    # query head x head dim x position x span slot: its packed layout treats
    # every span slot of a row as a sequence of the row's length. Read off
    # XLA's assignment on an H200: 32.6 GiB for the 1B shape at 8 x 4096 with
    # 66 slots, against 32.98 GiB by this formula.
    slots = attn.cudnn_span_slots(cfg.attention_max_segments)
    return rows * slots * queries * cfg.num_heads * cfg.head_size * 8
  width = {'xla': keys, 'blockwise': min(cfg.attention_block, keys)}[name]
  if name == 'blockwise' and self_attention:
    queries = min(queries, width)
  alive = {'xla': 3, 'blockwise': 2}[name]
  return rows * cfg.num_heads * queries * width * 4 * alive * (
      cfg.num_layers if cfg.remat_policy == 'none' and name == 'xla' else 1)


def _implementation(cfg: ModelConfig, key_len: int) -> str:
  return attn.choose(cfg.attention, key_len=key_len, block=cfg.attention_block,
                     sliding_window=cfg.sliding_window, dtype=cfg.dtype)


def _activations(cfg: ModelConfig, tokens: float, attention: float, head_rows: float,
                 head_len: int, blockwise_tokens: float = 0, output_bytes: int = 4) -> dict:
  """By part: `tokens` positions through the layers (`blockwise_tokens` of
  them as queries of the blockwise attention, whose kept output has
  `output_bytes` an element), the attention's score bytes, and the LM head
  over `head_rows` x `head_len` positions."""
  a = 2 if cfg.dtype != 'float32' else 4
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
  qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * h
  # One layer's activations, as XLA keeps them for its backward: norms and
  # residuals (D-wide, some in float32), q/k/v and the attention output,
  # gate/up/their product (F-wide).
  layer = tokens * (a * (6 * d + 2 * qkv + 3 * f) + 4 * 2 * d)
  saved = {'full': tokens * a * d,  # each layer's input, the scan's carry
           # and the weight matmuls' outputs but down's (q, k, v, o, gate, up),
           # the rotated queries and keys, and the blockwise attention's
           # output and float32 log-sum-exp
           'dots': tokens * a * (d + qkv + d + 2 * f + (cfg.num_heads + cfg.num_kv_heads) * h)
                   + blockwise_tokens * cfg.num_heads * (output_bytes * h + 4),
           'none': layer}[cfg.remat_policy] * cfg.num_layers
  chunk = min(cfg.logits_chunk or head_len, head_len)
  logits = head_rows * chunk * cfg.vocab_size * 4
  return {'saved_activations': saved, 'layer_backward': 2 * layer, 'attention': attention,
          'lm_head': logits}


def step_activations(cfg: ModelConfig, rows: float, seq_len: int, *, lm_head: bool = True,
                     head_len: int | None = None) -> dict:
  """A step over `rows` rows of `seq_len` tokens on this device (SFT; DPO
  and reward models put both sides of their pairs in one batch, and a scalar
  head instead of the LM head adds nothing worth counting). `head_len`: the
  LM head takes the tokens as rows of this many (SFT's padding-free rows as
  rows of data.max_len; default seq_len)."""
  name = _implementation(cfg, seq_len)
  scores = _attention(cfg, name, rows, seq_len, seq_len, self_attention=True)
  # The kept attention output: the CPU kernel's and the halved blockwise
  # path's in the compute dtype, the blockwise path's over blocks in float32.
  halved = attn.runs_in_halves(seq_len, cfg.attention_block) or name == 'cpu'
  head_len = head_len or seq_len
  return _activations(cfg, rows * seq_len, scores,
                      rows * seq_len / head_len if lm_head else 0, head_len,
                      rows * seq_len if name in ('blockwise', 'cpu') else 0,
                      output_bytes=2 if halved and cfg.dtype != 'float32' else 4)


def rl_update_activations(cfg: ModelConfig, prompts: float, samples: int, prompt_len: int,
                          new_tokens: int) -> dict:
  """A policy update over `prompts` prompts on this device, each with
  `samples` completions (decoder.shared_prompt_stack)."""
  rows = prompts * samples
  completion = _implementation(cfg, prompt_len + new_tokens)
  if completion in ('pallas', 'cudnn'):  # the GPU kernels are self-attention only (attention.attend)
    completion = 'blockwise'
  prompt = _implementation(cfg, prompt_len)
  scores = (_attention(cfg, prompt, prompts, prompt_len, prompt_len, self_attention=True)
            + _attention(cfg, completion, rows, new_tokens, prompt_len + new_tokens))
  kept = ((prompts * prompt_len if prompt in ('blockwise', 'cpu') else 0)
          + (rows * new_tokens if completion in ('blockwise', 'cpu') else 0))
  # The CPU kernel keeps its output in the compute dtype (both parts run on it or neither).
  sixteen_bit = completion == 'cpu' and cfg.dtype != 'float32'
  return _activations(cfg, prompts * prompt_len + rows * new_tokens, scores, rows, new_tokens,
                      kept, output_bytes=2 if sixteen_bit else 4)


def with_state(cfg: ModelConfig, activations: dict, fsdp: int = 1) -> dict:
  """The train state's bytes on a device (sharded over `fsdp` devices), then
  `activations`, and their 'total'."""
  params = cfg.num_params()
  sizes = {'params': params * 4 / fsdp, 'grads': params * 4 / fsdp,
           'optimizer': 2 * params * 4 / fsdp}
  if cfg.dtype != 'float32':
    sizes['weight_casts'] = params * 2 / fsdp
  sizes |= activations
  sizes['total'] = sum(sizes.values())
  return sizes


def shortfall(needed: float, stats: dict | None) -> tuple[float, float] | None:
  """(free, limit) bytes of a device whose free memory (its memory_stats():
  bytes_limit - bytes_in_use) is less than `needed` bytes; None when it has
  enough, or reports no limit (XLA:CPU's devices report no stats)."""
  if not stats or 'bytes_limit' not in stats:
    return None
  limit = float(stats['bytes_limit'])
  free = limit - float(stats.get('bytes_in_use', 0))
  return (free, limit) if needed > free else None
