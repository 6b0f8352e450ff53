"""The functional API in 40 lines: batch norm with explicit state, no Flax, under jit/grad/vmap.

    python experiments/demo.py
"""

import jax
import jax.numpy as jnp

import bnjax


def main():
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = 3.0 + 2.0 * jax.random.normal(key_x, (256, 16))  # [N, C], mean 3, std 2
  w = jax.random.normal(key_w, (16, 4)) / 4.0

  params, state = bnjax.batch_norm_init(16)

  @jax.jit
  def loss_and_state(params, state, x):
    y, new_state = bnjax.batch_norm(x, params, state, training=True, momentum=0.9)
    return jnp.mean((jax.nn.relu(y) @ w) ** 2), new_state

  grad_fn = jax.jit(jax.grad(lambda p, s, x: loss_and_state(p, s, x)[0]))
  for step in range(50):
    grads = grad_fn(params, state, x)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    loss, state = loss_and_state(params, state, x)  # the new state is returned, never mutated
  print(f'after {int(state.step)} steps: loss {float(loss):.4f}')
  print(f'moving mean ~ 3: {jnp.round(state.mean[:4], 3)}   moving var ~ 4: {jnp.round(state.var[:4], 3)}')

  y_eval, _ = bnjax.batch_norm(x, params, state, training=False)  # inference: moving statistics
  print(f'eval output mean {float(y_eval.mean()):.3f}, std {float(y_eval.std()):.3f}')

  # Batch renorm with the paper's warm-up, and ghost batches of 32.
  rmax, dmax = bnjax.renorm_clipping_warmup(warmup_steps=10, rmax_end_step=100, dmax_end_step=60)
  rparams, rstate = bnjax.batch_renorm_init(16)
  _, rstate = bnjax.batch_renorm(x, rparams, rstate, training=True, rmax=rmax, dmax=dmax, virtual_batch_size=32)
  print(f'renorm state after one step: renorm_std {jnp.round(rstate.renorm_std[:3], 3)}')

  # Eight momentum values at once: vmap over a hyperparameter.
  momenta = jnp.array([0.0, 0.5, 0.6, 0.75, 0.85, 0.9, 0.99, 0.999])
  states = jax.vmap(lambda m: bnjax.batch_norm(x, params, bnjax.batch_norm_init(16)[1], training=True, momentum=m)[1])(momenta)
  print('moving mean of feature 0 after one step, per momentum:', jnp.round(states.mean[:, 0], 3))


if __name__ == '__main__':
  main()
