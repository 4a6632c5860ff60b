"""Pure array helpers shared by losses: next-token targets, log-probs, masked
means, KL estimators, whitening and entropy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jpost import sharding


def next_token_targets(tokens, loss_mask, segment_ids):
  """(targets [B, T-1], weights [B, T-1]) for next-token prediction.

  Logits at position t predict token t+1. A target counts only if it is a
  target token (loss_mask) in the same non-zero segment as its predictor, so
  the first token of a packed sample is never predicted from the previous
  sample's last token.
  """
  same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  weights = loss_mask[:, 1:].astype(jnp.float32) * same_segment
  return tokens[:, 1:], weights


def token_logprobs(logits, targets):
  """log p(target) [B, T-1] from logits [B, T, V] (the last position has no target)."""
  logits = logits[:, :-1].astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def masked_sum(x, mask):
  return jnp.sum(x * mask)


def masked_mean(x, mask, *, normalizer=None):
  """sum(x * mask) / normalizer; normalizer defaults to sum(mask) (at least 1).

  Pass the whole batch's target count as `normalizer` when x is one
  micro-batch of it, so that accumulated micro-batches equal one large batch.
  """
  if normalizer is None:
    normalizer = jnp.sum(mask)
  return jnp.sum(x * mask) / jnp.maximum(normalizer, 1.0)


def pair_mean(weights, like):
  """A mean over pairs [B] (`like`'s shape) that leaves out pairs of weight 0
  (`weights` [B] of 1 or 0, None: all 1; the empty pairs that fill up a
  batch), whatever their values: x [B], normalizer=None -> the weighted
  pairs' sum of x / normalizer (default their count; at least 1, so a batch
  of empty pairs alone gives 0)."""
  w = jnp.ones_like(like) if weights is None else jnp.asarray(weights, jnp.float32)
  return lambda x, normalizer=None: masked_mean(jnp.where(w > 0, x, 0.0), w,
                                                normalizer=normalizer)


def sequence_mean(x, mask):
  """Per-sequence masked means [B] (rows without targets give 0)."""
  return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def per_sample_sums(x, weights, segment_ids):
  """(sums of x * weights, sums of weights), one slot per (row, segment) of
  next-token targets [B, T-1]; slot b * (T + 1) + s is sample s of row b."""
  b, t = segment_ids.shape
  ids = (jnp.arange(b)[:, None] * (t + 1) + segment_ids[:, 1:]).reshape(-1)
  sums = jax.ops.segment_sum((x * weights).reshape(-1), ids, num_segments=b * (t + 1))
  counts = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=b * (t + 1))
  return sums, counts


# KL estimators and whitening for online RL.

KL_ESTIMATORS = ('k1', 'k2', 'k3')


def kl_estimate(logprobs, ref_logprobs, estimator):
  """Per-token estimate of KL(pi || ref) from tokens sampled from pi (elementwise).

  With log_ratio = ref_logprobs - logprobs (Schulman's estimators):
    k1 = -log_ratio
    k2 = 0.5 * log_ratio**2
    k3 = exp(log_ratio) - 1 - log_ratio

  Value, in expectation over x ~ pi: E[k1] = E[k3] = KL(pi || ref) exactly
  (k3 is never negative, so it has lower variance than k1); E[k2] is biased
  (it is only close to KL when pi and ref are close).

  Gradient, when the estimate is put in the loss and the sampled tokens are held
  fixed (what a trainer differentiating `kl_coef * k` does):
    k2: E[grad k2] = grad KL(pi || ref) exactly; the estimator to use in a loss.
    k1: E[grad k1] = E[grad log pi] = 0; useless in a loss. Its gradient arrives
        only through the score function, so k1 belongs in the reward.
    k3: E[grad k3] = grad KL(ref || pi), the *forward* KL: a biased gradient for
        the reverse KL it estimates the value of.
  tests/test_losses_policy.py proves each of these by exact enumeration.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f'KL estimator {estimator!r} unknown; use one of {KL_ESTIMATORS}.')
  log_ratio = ref_logprobs - logprobs
  if estimator == 'k1':
    return -log_ratio
  if estimator == 'k2':
    return 0.5 * jnp.square(log_ratio)
  return jnp.expm1(log_ratio) - log_ratio


def whiten(x, mask, *, shift_mean=True, eps=1e-8):
  """(x - mean) / sqrt(var + eps) over all entries where mask is 1; 0 elsewhere.

  The mean and variance are taken over every masked entry of the whole array
  (not per row). The variance is the unbiased one (numpy ddof=1; with a single
  masked entry the denominator is clamped to 1). shift_mean=False adds the mean
  back, so only the scale changes.
  """
  valid = mask > 0
  mask = valid.astype(jnp.float32)
  x = jnp.where(valid, x.astype(jnp.float32), 0.0)  # padding may hold anything
  count = jnp.sum(mask)
  mean = jnp.sum(x * mask) / jnp.maximum(count, 1.0)
  var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(count - 1.0, 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(valid, out, 0.0)


def token_entropy(logits):
  """Entropy [B, T-1] of the next-token distribution at each position that has a
  target, aligned with `token_logprobs` (the last position is dropped)."""
  return _entropy(*_softmax_terms(logits[:, :-1].astype(jnp.float32)))


def _softmax_terms(logits, forward_only: bool = False):
  """(logits [..., V] - their max, exp of that, its sum [...]): what log-probs
  and entropies are made of. The max is a constant to differentiation (any
  shift gives the same values), as in logsumexp. `forward_only`: the sum
  by `_forward_vocab_sum`."""
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shifted = logits - jnp.where(jnp.isfinite(top), top, 0.0)  # a row all -inf stays -inf
  exp = jnp.exp(shifted)
  return shifted, exp, (_forward_vocab_sum(exp) if forward_only else jnp.sum(exp, axis=-1))


def _entropy(shifted, exp, total, forward_only: bool = False):
  """-sum p log p = log total - sum(exp * shifted) / total, from the terms the
  log-probs have already computed; log_softmax would compute the max, exp and
  sum again and write another [..., V] float32 array."""
  # Tokens masked to -inf have probability 0 and contribute 0 (not 0 * -inf).
  spread = exp * jnp.where(jnp.isfinite(shifted), shifted, 0.0)
  spread = _forward_vocab_sum(spread) if forward_only else jnp.sum(spread, axis=-1)
  return jnp.log(total) - spread / total


def _forward_vocab_sum(x):
  """x [..., V] summed over its last axis (a softmax's sum of exps), in a
  computation that autodiff does not differentiate (a custom_vjp's forward).

  XLA:CPU hands a large row sum to YNNPACK, and with it the exp that feeds
  it, which YNNPACK evaluates about 4x slower than XLA's own fused loop
  ([448, 49152] float32: 33 against 8.8 ms). XLA keeps a sum of a product to
  itself, so on CPU the rows are multiplied by ones first, ones that XLA
  cannot see are ones (an optimization barrier), or it would drop the
  product again. (Under autodiff, SFT's head, the product's sum went back
  to YNNPACK and ran slower still: bench/RESULTS.md.)"""
  if jax.default_backend() != 'cpu':
    return jnp.sum(x, axis=-1)
  ones = jax.lax.optimization_barrier(jnp.ones((x.shape[-1],), x.dtype))
  return jnp.sum(x * ones, axis=-1)


def head_logprobs(logits_fn, hidden, targets, *, chunk: int = 0, entropy: str = 'none'):
  """log p(target) [B, T] of the token after each of hidden [B, T, D]
  (through logits_fn(hidden) -> float32 logits [B, T, V]), and, unless
  `entropy` is 'none', each position's entropy [B, T] ('metric': without a
  gradient; 'loss': with one).

  With `chunk` (positions) below T, the logits exist `chunk` positions at a
  time and are recomputed in the backward pass: a 128k-152k vocabulary's
  [B, T, V] float32 logits (2 GB per 4k tokens) are never held whole.
  """
  def one(h, t):
    # Log-probs and entropies share one max, exp and sum over the chunk's
    # [B, C, V] logits. Through logsumexp, then log_softmax over a copy with a
    # pad column, the entropy metric cost a GRPO update of SmolLM2
    # (2 x 8 x <= 128) 0.55 s of 6.4 (bench/RESULTS.md).
    shifted, exp, total = _softmax_terms(logits_fn(h))
    logp = jnp.take_along_axis(shifted, t[..., None], axis=-1)[..., 0] - jnp.log(total)
    if entropy == 'none':
      return logp, jnp.zeros_like(logp)
    ent = _entropy(shifted, exp, total)
    return logp, ent if entropy == 'loss' else jax.lax.stop_gradient(ent)

  b, t, _ = hidden.shape
  if not chunk or t <= chunk:
    logp, ent = one(hidden, targets)
  else:
    pad = -t % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tg = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    # Chunks along a leading axis for the scan; the batch axis stays where
    # the mesh shards it.
    h = h.reshape(b, n, chunk, -1).swapaxes(0, 1)
    tg = tg.reshape(b, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda _, x: (None, one(*x)))
    _, (logp, ent) = jax.lax.scan(body, None, (h, tg))
    logp, ent = (a.swapaxes(0, 1).reshape(b, -1)[:, :t] for a in (logp, ent))
  return (logp, ent) if entropy != 'none' else logp


def head_weighted_logprobs(logits_fn, weight, hidden, targets, token_weights, *,
                           chunk: int = 0):
  """(sum of token_weights * log p(targets), log p(targets) [B, T]) after each
  of hidden [B, T, D], through logits_fn(hidden, weight) -> float32 logits
  [B, T, V]; the log-probs come back without a gradient (for metrics), and
  0 where the token weight is 0 (on one device those are not computed:
  `_weighted_head_compacted`).

  For losses linear in the log-probs, with weights known before the head
  (SFT). Their gradient with respect to `weight` and `hidden` is then the
  cotangent times one computed in the forward pass, `chunk` positions of
  every row at a time (on one device, B x `chunk` of the positions that
  have a weight, gathered from all rows), while each chunk's logits are at
  hand: the logits are computed once,
  not again in the backward pass as `head_logprobs` with a chunk does (6
  instead of 8 x T x D x V FLOPs), and [B, T, V] is still never held whole.
  The price: the gradients ([V, D] float32 and hidden's) are held from the
  forward pass to the backward.
  """
  value, logp = _weighted_head(logits_fn, chunk, weight, hidden, targets, token_weights)
  return value, jax.lax.stop_gradient(jnp.where(token_weights != 0, logp, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _weighted_head(logits_fn, chunk, weight, hidden, targets, token_weights):
  # Undifferentiated (evaluation): the log-probs alone, no gradients to drop,
  # of the weighted positions alone where those can be gathered.
  logp = head_masked_logprobs(logits_fn, weight, hidden, targets, token_weights != 0,
                              chunk=chunk)
  return jnp.sum(logp * token_weights.astype(jnp.float32)), logp


def _weighted_head_parts(logits_fn, chunk, weight, hidden, targets, token_weights):
  """(value, log-probs, d value / d weight, d value / d hidden)."""
  b, t, _ = hidden.shape
  token_weights = token_weights.astype(jnp.float32)
  if not chunk or t <= chunk:
    return _weighted_head_piece(logits_fn, weight, hidden, targets, token_weights)
  if sharding.active_mesh_size() == 1:
    return _weighted_head_compacted(logits_fn, b * chunk, weight, hidden, targets,
                                    token_weights)
  pad = -t % chunk
  n = (t + pad) // chunk
  # Chunks along a leading axis for the scan; the batch axis stays where the
  # mesh shards it.
  split = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)).reshape(
      b, n, chunk, *a.shape[2:]).swapaxes(0, 1)

  def body(carry, x):
    total, d_weight = carry
    value, logp, dw, dh = _weighted_head_piece(logits_fn, weight, *x)
    # Hidden's gradient is stacked in float32: XLA:CPU writes a 16-bit stack
    # in a loop by converting all of it to float32 and back (models/remat.py).
    return (total + value, d_weight + dw), (logp, dh.astype(jnp.float32))

  # The weight's gradient sums over chunks in float32 whatever its dtype.
  init = (jnp.zeros((), jnp.float32), jnp.zeros(weight.shape, jnp.float32))
  (value, d_weight), (logp, d_hidden) = jax.lax.scan(
      body, init, (split(hidden), split(targets), split(token_weights)))
  merge = lambda a: a.swapaxes(0, 1).reshape(b, n * chunk, *a.shape[3:])[:, :t]
  return (value, merge(logp), d_weight.astype(weight.dtype),
          merge(d_hidden).astype(hidden.dtype))


def _weighted_head_piece(logits_fn, weight, h, t, w):
  """`_weighted_head_parts` of one piece, all at once."""
  def weighted(weight, h):
    logits = logits_fn(h, weight)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(logp * w), logp
  (value, logp), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(weight, h)
  return value, logp, *grads


def _weighted_head_compacted(logits_fn, chunk, weight, hidden, targets, token_weights):
  """`_weighted_head_parts` over the positions that carry a weight only,
  `chunk` of them at a time (as many as B rows' chunks would hold): the B x T
  positions are reordered so that those come first (in order), and a loop
  runs as many pieces as they fill. An SFT batch's target tokens are 35-46%
  of its slots (GSM8K, 8 x 256: prompts and padding carry no weight), so the
  head's matmuls and its softmax over the vocabulary run on about half the
  rows they would. One device only: over a mesh the reordering would gather
  every device's rows and run the head on each."""
  b, t, d = hidden.shape
  n = b * t
  order, pieces, pad = _compacted(token_weights != 0, chunk)
  gather = functools.partial(_gathered, order=order, pad=pad)
  h, tg, w = gather(hidden), gather(targets), gather(token_weights)

  def body(i, carry):
    total, d_weight, logp, d_hidden = carry
    start = i * chunk
    # One row of `chunk` positions: logits_fn takes [B, T, D].
    piece = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk)[None]
    value, piece_logp, dw, dh = _weighted_head_piece(logits_fn, weight, piece(h), piece(tg),
                                                      piece(w))
    return (total + value, d_weight + dw,
            jax.lax.dynamic_update_slice_in_dim(logp, piece_logp[0], start, 0),
            jax.lax.dynamic_update_slice_in_dim(d_hidden, dh[0].astype(jnp.float32), start, 0))

  # Sums and the hidden gradient in float32 (models/remat.py: a 16-bit array
  # written in a loop goes through float32 on CPU anyway).
  init = (jnp.zeros((), jnp.float32), jnp.zeros(weight.shape, jnp.float32),
          jnp.zeros((n + pad,), jnp.float32), jnp.zeros((n + pad, d), jnp.float32))
  value, d_weight, logp, d_hidden = jax.lax.fori_loop(0, pieces, body, init)
  # Back to the positions' own order. Those past the last piece read zeros;
  # the weightless ones inside it have their log-prob and a zero gradient.
  restore = jnp.argsort(order)
  logp = logp[restore].reshape(b, t)
  d_hidden = d_hidden[restore].reshape(b, t, d)
  return value, logp, d_weight.astype(weight.dtype), d_hidden.astype(hidden.dtype)


def _weighted_head_fwd(logits_fn, chunk, weight, hidden, targets, token_weights):
  value, logp, d_weight, d_hidden = _weighted_head_parts(
      logits_fn, chunk, weight, hidden, targets, token_weights)
  return (value, logp), (d_weight, d_hidden)


def _weighted_head_bwd(logits_fn, chunk, residuals, cotangents):
  del logits_fn, chunk
  d_weight, d_hidden = residuals
  g = cotangents[0]  # the log-probs' own cotangent is zero: they leave stop_gradient'ed
  return ((g * d_weight).astype(d_weight.dtype), (g * d_hidden).astype(d_hidden.dtype),
          None, None)


_weighted_head.defvjp(_weighted_head_fwd, _weighted_head_bwd)


def head_masked_logprobs(logits_fn, weight, hidden, targets, mask, *, chunk: int = 0,
                         entropy: str = 'none'):
  """log p(targets) [B, T] where `mask` [B, T] is true, 0 (without a
  gradient) where it is not, through logits_fn(hidden, weight) -> float32
  logits [B, T, V]; unless `entropy` is 'none', also each masked position's
  entropy [B, T] ('metric': without a gradient; 'loss': with one), 0 outside
  the mask.

  For losses that are not linear in the log-probs, so that the head cannot
  take its gradient in the forward pass (`head_weighted_logprobs`): DPO's
  summed log-probs of each response inside a sigmoid, the clipped ratios of
  GRPO and PPO. On one device, with `chunk` below T, only the masked
  positions are computed, B x `chunk` of them at a time, gathered from every
  row: forward and backward loop over as many pieces as they fill, and the
  backward recomputes those pieces' logits alone. A DPO batch's response
  tokens are under a third of its slots (GSM8K pairs in rows of 128: 28%;
  prompts and padding are not), an RL update's completion tokens a third to
  two thirds of its packed rows, so the head runs on that share of the
  positions. Elsewhere, `head_logprobs` with the positions outside the mask
  set to 0.
  """
  if entropy not in ('none', 'metric', 'loss'):
    raise ValueError(f"entropy={entropy!r}: use 'none', 'metric' or 'loss'.")
  b, t, _ = hidden.shape
  mask = mask.astype(bool)
  if not chunk or t <= chunk or sharding.active_mesh_size() != 1:
    out = head_logprobs(lambda h: logits_fn(h, weight), hidden, targets, chunk=chunk,
                        entropy=entropy)
    return jax.tree.map(lambda a: jnp.where(mask, a, 0.0), out)
  logp, ent = _masked_head(logits_fn, b * chunk, entropy, weight, hidden, targets, mask)
  if entropy == 'none':
    return logp
  return logp, ent if entropy == 'loss' else jax.lax.stop_gradient(ent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _masked_head(logits_fn, piece, entropy, weight, hidden, targets, mask):
  return _masked_head_fwd(logits_fn, piece, entropy, weight, hidden, targets, mask)[0]


def _compacted(mask, piece):
  """(order that puts the masked of mask's B x T positions first, in order;
  the pieces of `piece` positions they fill; the padding that makes the
  positions whole pieces)."""
  flat = mask.reshape(-1)
  order = jnp.argsort(~flat, stable=True)
  return order, (jnp.sum(flat) + piece - 1) // piece, -flat.shape[0] % piece


def _gathered(a, *, order, pad):
  """a [B, T, ...] as [B x T + pad, ...] rows in `order`, zeros after."""
  rows = a.reshape(-1, *a.shape[2:])[order]
  return jnp.pad(rows, ((0, pad),) + ((0, 0),) * (a.ndim - 2))


def _masked_head_fwd(logits_fn, piece, entropy, weight, hidden, targets, mask):
  b, t, _ = hidden.shape
  order, pieces, pad = _compacted(mask, piece)
  gather = functools.partial(_gathered, order=order, pad=pad)
  # The last piece's tail holds positions outside the mask: zeros there, so
  # that nothing of theirs (a padded slot's NaN, say) reaches the gradient.
  h = jnp.where(gather(mask)[:, None], gather(hidden), 0)
  tg = gather(targets)

  def body(i, carry):
    logp, lse, ent = carry
    start = i * piece
    logits = logits_fn(jax.lax.dynamic_slice_in_dim(h, start, piece)[None], weight)[0]
    target = jax.lax.dynamic_slice_in_dim(tg, start, piece)
    update = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, start, 0)
    # One max, exp and sum for the log-probs and the entropies (head_logprobs).
    shifted, exp, total = _softmax_terms(logits, forward_only=True)
    log_total = jnp.log(total)
    piece_logp = jnp.take_along_axis(shifted, target[:, None], axis=-1)[:, 0] - log_total
    top = jnp.max(logits, axis=-1)  # lse = the shift _softmax_terms took + log(total)
    piece_lse = log_total + jnp.where(jnp.isfinite(top), top, 0.0)
    if entropy != 'none':
      ent = update(ent, _entropy(shifted, exp, total, forward_only=True))
    return update(logp, piece_logp), update(lse, piece_lse), ent

  zeros = jnp.zeros((b * t + pad,), jnp.float32)
  logp, lse, ent = jax.lax.fori_loop(0, pieces, body, (zeros, zeros, zeros))
  # Back to the positions' own order: those past the last piece read zeros.
  restore = jnp.argsort(order)
  unsort = lambda a: jnp.where(mask, a[restore].reshape(b, t), 0.0)
  return (unsort(logp), unsort(ent)), (weight, h, tg, lse, ent, order, pieces, mask)


def _masked_head_bwd(logits_fn, piece, entropy, residuals, cotangents):
  weight, h, tg, lse, ent, order, pieces, mask = residuals
  b, t = mask.shape
  # Positions outside the mask (the tail of the last piece) get no cotangent.
  sort = lambda a: jnp.pad(jnp.where(mask, a, 0.0).reshape(-1)[order], (0, h.shape[0] - b * t))
  d_logp, d_ent = map(sort, cotangents)

  def body(i, carry):
    d_weight, d_hidden = carry
    start = i * piece
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, piece)
    logits, vjp = jax.vjp(lambda x, w: logits_fn(x[None], w)[0], take(h), weight)
    # d log p(target) / d logits = onehot(target) - p, times the cotangent;
    # d entropy / d logits = -p (log p + entropy).
    c, log_p = take(d_logp), logits - take(lse)[:, None]
    p = jnp.exp(log_p)
    if entropy == 'loss':
      d_logits = -p * (c[:, None] + take(d_ent)[:, None] * (log_p + take(ent)[:, None]))
    else:
      d_logits = -c[:, None] * p
    d_logits = d_logits.at[jnp.arange(piece), take(tg)].add(c)
    dh, dw = vjp(d_logits)
    return (d_weight + dw.astype(jnp.float32),
            jax.lax.dynamic_update_slice_in_dim(d_hidden, dh.astype(jnp.float32), start, 0))

  # Sums and the hidden gradient in float32 (models/remat.py: a 16-bit array
  # written in a loop goes through float32 on CPU anyway).
  init = (jnp.zeros(weight.shape, jnp.float32), jnp.zeros(h.shape, jnp.float32))
  d_weight, d_hidden = jax.lax.fori_loop(0, pieces, body, init)
  d_hidden = d_hidden[jnp.argsort(order)].reshape(b, t, -1)
  return d_weight.astype(weight.dtype), d_hidden.astype(h.dtype), None, None


_masked_head.defvjp(_masked_head_fwd, _masked_head_bwd)
