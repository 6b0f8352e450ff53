"""Batch norm in a Flax NNX model: an MNIST MLP with `bnjax.nnx.BatchNorm`, against the same MLP without.

    python experiments/nnx_mnist.py --data_dir=../shared/data --steps=2000

The three-layer sigmoid MLP of the BN paper's MNIST experiment (100 units a
layer), trained with SGD on batches of 60, once with a BN layer after each
linear layer and once without; prints the test accuracy of both (the BN
model evaluated with its moving statistics, `model.eval()`, and again with
precise statistics, `bnjax.nnx.precise_statistics`).
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import bnjax.nnx
from bnjax.lab import cli, data

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'Folder with MNIST (mnist/ with the IDX files); default: the usual places.')
flags.DEFINE_enum('data_source', 'auto', ['auto', 'files', 'tfds'], 'auto: local files when found, else TFDS.')
flags.DEFINE_integer('steps', 2000, 'Training steps.')
flags.DEFINE_integer('batch_size', 60, 'Examples per step.')
flags.DEFINE_float('learning_rate', 0.5, 'SGD learning rate.')
flags.DEFINE_integer('seed', 0, 'Seed of the initialization and of the batch order.')
flags.DEFINE_bool('verbose', False, 'Show the traceback of an error (users get one line without it).')


class MLP(nnx.Module):
  """784 -> 100 -> 100 -> 100 -> 10, sigmoid; `batch_norm`: Linear -> BatchNorm -> sigmoid."""

  def __init__(self, batch_norm: bool, *, rngs: nnx.Rngs):
    sizes = (784, 100, 100, 100)
    self.linears = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.norms = nnx.List([bnjax.nnx.BatchNorm(b, rngs=rngs) for b in sizes[1:]] if batch_norm else [])
    self.head = nnx.Linear(sizes[-1], 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, linear in enumerate(self.linears):
      x = linear(x)
      x = nnx.sigmoid(self.norms[i](x) if self.norms else x)
    return self.head(x)


@nnx.jit
def train_step(model, optimizer, images, labels):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, images, labels):
  return jnp.mean(jnp.argmax(model(images), -1) == labels)


def train(batch_norm: bool, dataset) -> nnx.Module:
  model = MLP(batch_norm, rngs=nnx.Rngs(FLAGS.seed))
  optimizer = nnx.Optimizer(model, optax.sgd(FLAGS.learning_rate), wrt=nnx.Param)
  key = jax.random.key(FLAGS.seed)
  num_train = dataset.train_images.shape[0]
  model.train()
  for step in range(FLAGS.steps):
    batch = jax.random.randint(jax.random.fold_in(key, step), (FLAGS.batch_size,), 0, num_train)
    train_step(model, optimizer, dataset.train_images[batch], dataset.train_labels[batch])
  model.eval()
  return model


def stacked_batches(images, batch_size):
  """`images` as stacked batches `[S, B, ...]`, the remainder left out."""
  count = images.shape[0] // batch_size
  return images[:count * batch_size].reshape(count, batch_size, *images.shape[1:])


def main(argv):
  del argv
  dataset = data.load('mnist', source=FLAGS.data_source, data_dir=FLAGS.data_dir)  # a data error ends as one line (cli.one_line_errors)
  test = (dataset.test_images, dataset.test_labels)
  for batch_norm in (False, True):
    model = train(batch_norm, dataset)
    line = f'{"with BN" if batch_norm else "without BN"}: test accuracy {float(accuracy(model, *test)):.4f}'
    if batch_norm:
      bnjax.nnx.precise_statistics(model, stacked_batches(dataset.train_images, FLAGS.batch_size))
      line += f', with precise statistics {float(accuracy(model, *test)):.4f}'
    print(line, flush=True)


if __name__ == '__main__':
  app.run(cli.one_line_errors(main), flags_parser=cli.parse_flags)
