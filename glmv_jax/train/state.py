"""TrainState: a plain pytree (step, params, opt_state, rng, nonfinite_count), born sharded.

    opt = build_optimizer(config.optimizer)
    shardings = state_shardings(opt, abstract_params, param_shardings, mesh)        # or None on one device
    state = init_train_state(init_fn, opt, jax.random.PRNGKey(0), shardings)       # init_fn(rng) -> params
    state = train_state_from_params(params, opt, jax.random.PRNGKey(0), shardings) # loaded weights

`param_shardings` comes from the model's logical axes: `sharding.rules.tree_shardings(logical, params, mesh,
rules)` (see `param_shardings_from_logical`). Optimizer moments take the sharding of their parameter,
scalars (counts, step, rng) are replicated. `init_train_state` runs under `jax.jit(out_shardings=...)`, so
no device ever holds an unsharded copy of the parameters or the optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmv_jax.sharding import rules as rules_lib
from glmv_jax.train.optimizer import Optimizer, path_str


@flax.struct.dataclass
class TrainState:
    step: jax.Array             # int32 [], number of train steps taken (batches consumed)
    params: Any                 # nested dict of fp32 arrays (PARAM_TREE.md)
    opt_state: Any              # optax state of `Optimizer.tx`
    rng: jax.Array              # uint32 [2] raw PRNG key; per-step keys are fold_in(rng, step)
    nonfinite_count: jax.Array  # int32 [], steps skipped because loss or gradients were NaN/Inf

    @property
    def applied_updates(self) -> jax.Array:
        """Number of optimizer updates applied (= the learning-rate schedule's position)."""
        return self.step - self.nonfinite_count


def default_sharding() -> jax.sharding.Sharding:
    """Where an unsharded state lives: the first local device, committed (as checkpoint restores place it,
    so a restored state hits the same compiled step as a fresh one)."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    if rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a PRNG key (jax.random.PRNGKey / jax.random.key), got dtype {rng.dtype}")
    return rng


def _new_state(params: Any, optimizer: Optimizer, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.tx.init(params),
                      rng=_raw_key(rng), nonfinite_count=jnp.zeros((), jnp.int32))


def param_shardings_from_logical(logical_axes: Any, abstract_params: Any, mesh: Mesh,
                                 rules: rules_lib.Rules = rules_lib.DEFAULT) -> Any:
    """NamedShardings for params from the tree of logical axis-name tuples (sharding.rules)."""
    return rules_lib.tree_shardings(logical_axes, abstract_params, mesh, rules)


def _opt_state_shardings(abstract_opt: Any, abstract_params: Any, param_shardings: Any, replicated) -> Any:
    """A leaf of the optimizer state whose key path ends with a parameter's path (and has its shape), such as
    adam's mu['text']['embed']['embedding'], takes that parameter's sharding; other leaves are replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(param_shardings)):
        by_path[tuple(path_str([k]) for k in path)] = (tuple(leaf.shape), sharding)
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, leaf):
        names = tuple(path_str([k]) for k in path)
        for n in lengths:
            shape, sharding = by_path.get(names[-n:], (None, None))
            if sharding is not None and shape == tuple(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(optimizer: Optimizer, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> TrainState:
    """TrainState of NamedShardings: moments follow their parameter, everything else replicated."""
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_params)
    opt_shardings = _opt_state_shardings(abstract_opt, abstract_params, param_shardings, replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
                      nonfinite_count=replicated)


def abstract_train_state(optimizer: Optimizer, abstract_params: Any, shardings: TrainState | None = None,
                         rng: jax.Array | None = None) -> TrainState:
    """ShapeDtypeStruct tree of the state (with shardings when given): the target for checkpoint restore."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    shapes = jax.eval_shape(lambda p: _new_state(p, optimizer, rng), abstract_params)
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(init_fn: Callable[[jax.Array], Any], optimizer: Optimizer, rng: jax.Array,
                     shardings: TrainState | None = None) -> TrainState:
    """Fresh state: params = init_fn(param_rng); the state keeps the other half of the split key."""
    param_rng, state_rng = jax.random.split(rng)
    build = lambda: _new_state(init_fn(param_rng), optimizer, state_rng)
    return jax.jit(build, out_shardings=default_sharding() if shardings is None else shardings)()


def train_state_from_params(params: Any, optimizer: Optimizer, rng: jax.Array,
                            shardings: TrainState | None = None) -> TrainState:
    """State around existing params (e.g. loaded from HF or a previous stage), resharded as `shardings` says."""
    param_sharding = default_sharding() if shardings is None else shardings.params
    scalar_sharding = default_sharding() if shardings is None else shardings.step
    opt_sharding = default_sharding() if shardings is None else shardings.opt_state
    params = jax.device_put(params, param_sharding)
    opt_state = jax.jit(optimizer.tx.init, out_shardings=opt_sharding)(params)
    scalar = lambda x: jax.device_put(jnp.asarray(x), scalar_sharding)
    return TrainState(step=scalar(jnp.zeros((), jnp.int32)), params=params, opt_state=opt_state,
                      rng=scalar(_raw_key(rng)), nonfinite_count=scalar(jnp.zeros((), jnp.int32)))
