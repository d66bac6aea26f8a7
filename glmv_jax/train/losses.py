"""Token losses in fp32, returned as (sum over tokens, token count) so accumulation can weight by tokens.

    loss_sum, count, extras = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss=1e-4)
    loss_sum, count, extras = chunked_cross_entropy(hidden, lm_kernel, targets, loss_mask, chunk_size=512)

The full-logits version upcasts inside the reductions (logsumexp over V and the target gather run in fp32
per position; no fp32 copy of [B, T, V] is required). The chunked version never builds [B, T, V]: it
computes logits for `chunk_size` positions at a time under `jax.checkpoint`, so the backward pass also
holds one chunk of logits at a time (MaxText's "vocab tiling").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_shapes(logits_shape, targets, loss_mask) -> None:
    if targets.shape != loss_mask.shape:
        raise ValueError(f"targets {targets.shape} and loss_mask {loss_mask.shape} must have the same shape")
    if tuple(logits_shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"logits {tuple(logits_shape)} do not match targets {targets.shape}: expected [..., V] "
                         f"with leading dims {targets.shape}")


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-position cross entropy and z-loss, fp32.

    logits [..., V] (any float dtype), targets [...] int -> (ce [...], z [...]) where
    ce = logsumexp(logits) - logits[target] and z = z_loss * logsumexp(logits)^2.
    """
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = lse - target_logit.astype(jnp.float32)
    return ce, z_loss * jnp.square(lse)


def _reduce(ce: jax.Array, z: jax.Array, loss_mask: jax.Array, z_loss: float):
    mask = loss_mask.astype(jnp.float32)
    ce_sum = jnp.sum(ce * mask)
    z_sum = jnp.sum(z * mask)
    extras = {"ce_sum": ce_sum, "z_loss_sum": z_sum, "token_loss": ce}
    return ce_sum + z_sum if z_loss else ce_sum, jnp.sum(mask), extras


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, z_loss: float = 0.0):
    """Masked next-token cross entropy from full logits.

    logits [B, T, V], targets [B, T] int, loss_mask [B, T] (0/1 or weights) ->
    (loss_sum scalar fp32 (ce + z-loss over masked tokens), token_count scalar fp32,
     extras {"ce_sum", "z_loss_sum", "token_loss" [B, T]}).
    """
    _check_shapes(logits.shape, targets, loss_mask)
    ce, z = token_losses(logits, targets, z_loss)
    return _reduce(ce, z, loss_mask, z_loss)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                          chunk_size: int = 512, z_loss: float = 0.0, logits_dtype=jnp.float32):
    """Same result as `cross_entropy(hidden @ kernel, ...)` without materializing [B, T, V] logits.

    hidden [B, T, D], kernel [D, V] (the lm_head), targets/loss_mask [B, T]; T must be divisible by
    chunk_size. The matmul runs in `logits_dtype`-compatible precision of the inputs; losses in fp32.
    """
    B, T, D = hidden.shape
    if kernel.shape[0] != D:
        raise ValueError(f"lm kernel {kernel.shape} does not match hidden width {D}")
    _check_shapes((B, T, kernel.shape[1]), targets, loss_mask)
    if chunk_size <= 0 or T % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must be positive and divide the sequence length {T}")
    n = T // chunk_size
    # [n, B, C, ...] so lax.map walks the chunks.
    to_chunks = lambda x: jnp.moveaxis(x.reshape(B, n, chunk_size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one_chunk(args):
        h, t = args
        logits = jnp.einsum("BCD,DV->BCV", h, kernel, preferred_element_type=logits_dtype)
        return token_losses(logits, t, z_loss)

    ce, z = jax.lax.map(one_chunk, (to_chunks(hidden), to_chunks(targets)))
    from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, T)
    return _reduce(from_chunks(ce), from_chunks(z), loss_mask, z_loss)


def per_domain_sums(token_loss: jax.Array, loss_mask: jax.Array, domain: jax.Array, num_domains: int):
    """Loss sums and token counts per domain, for per-domain metrics.

    token_loss, loss_mask [B, T]; domain [B] int in [0, num_domains) -> (loss_sum [num_domains],
    token_count [num_domains]) fp32. Return them in the aux dict under keys ending in "_sum" so the step
    adds them up across micro-batches.
    """
    mask = loss_mask.astype(jnp.float32)
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)            # [B, n]
    return (jnp.einsum("BT,Bn->n", token_loss * mask, onehot), jnp.einsum("BT,Bn->n", mask, onehot))
