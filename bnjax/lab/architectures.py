"""The study models' architectures, by name: layers, defaults and the source's training settings.

No JAX or Flax here: the CLIs check a model name and its layer widths (a
group count must divide every width) before anything heavy is imported.
`bnjax.lab.models` builds the Flax modules from these entries.

The architecture is a tuple of steps: `('flatten',)`, `('dense', features)`,
`('conv', features)` (3x3, SAME) or `('pool', size)` (max pool, stride = size).
Dense and conv steps are *blocks*: linear layer, norm and activation.
"""

from __future__ import annotations

from typing import NamedTuple


class Architecture(NamedTuple):
  """A registered model.

  Attributes:
    layers: the steps (see the module docstring).
    options: model options other than the layers (activation, kernel_init).
    train: the source's training hyperparameters: dataset, optimizer,
      learning_rate, batch_size, and epochs or steps.
    description: one line.
    aliases: older names of the same model.
  """

  layers: tuple
  options: dict
  train: dict
  description: str
  aliases: tuple = ()


def mlp(widths) -> tuple:
  return (('flatten',),) + tuple(('dense', width) for width in widths)


def cnn(channels, dense) -> tuple:
  conv = tuple(step for c in channels for step in (('conv', c), ('conv', c), ('pool', 2)))
  return conv + (('flatten',), ('dense', dense))


ARCHITECTURES: dict[str, Architecture] = {
    'mnist_mlp': Architecture(
        layers=mlp((256, 128, 512, 64, 128, 256)),
        options=dict(activation='relu'),
        train=dict(dataset='mnist', optimizer='adam', learning_rate=1e-3, batch_size=500, epochs=20),
        description='MNIST MLP of the source: Dense 256, 128, 512, 64, 128, 256, each with norm and activation.',
        aliases=('mlp_seed',),
    ),
    'cifar_cnn': Architecture(
        layers=cnn((32, 64, 128), 256),
        options=dict(activation='relu'),
        train=dict(dataset='cifar10', optimizer='adam', learning_rate=1e-4, batch_size=32, epochs=30),
        description='CIFAR-10 CNN of the source: 3 x (2 x Conv3x3 block, MaxPool 2) with 32, 64, 128 channels, '
                    'Dense 256 block.',
        aliases=('cnn_seed',),
    ),
    'mlp_bn_paper': Architecture(
        # "weights initialized to small random Gaussian values": Flax's lecun_normal.
        layers=mlp((100, 100, 100)),
        options=dict(activation='sigmoid', kernel_init='lecun_normal'),
        # Section 4.1 gives SGD, 50,000 steps of 60 examples; the learning rate is not stated: 0.1 is ours.
        train=dict(dataset='mnist', optimizer='sgd', learning_rate=0.1, batch_size=60, steps=50_000),
        description='Ioffe & Szegedy 2015, section 4.1: 3 Dense 100 sigmoid blocks.',
    ),
}
ALIASES = {alias: name for name, arch in ARCHITECTURES.items() for alias in arch.aliases}
# Models whose input must be a given data set (None: any image size, flattened).
IMAGE_DATASET = {'mnist_mlp': None, 'mlp_bn_paper': None, 'cifar_cnn': 'cifar10'}


def names(with_aliases: bool = False) -> tuple[str, ...]:
  """The registered model names (and their aliases)."""
  return tuple(ARCHITECTURES) + (tuple(ALIASES) if with_aliases else ())


def canonical_name(name: str) -> str:
  """The model's name for an alias (`mlp_seed` -> `mnist_mlp`); other names unchanged."""
  return ALIASES.get(name, name)


def get(name: str) -> Architecture:
  name = canonical_name(name)
  if name not in ARCHITECTURES:
    raise ValueError(f'Unknown model {name!r}; the models are {", ".join(map(repr, names(True)))}.')
  return ARCHITECTURES[name]


def block_widths(layers: tuple) -> list[int]:
  """The features (channels) of every dense or conv block, in order."""
  return [step[1] for step in layers if step[0] in ('dense', 'conv')]


def has_convolutions(layers: tuple) -> bool:
  return any(step[0] == 'conv' for step in layers)
