"""The models the lab trains: registered builders by name, or any builder by import path.

A model is a *builder*: a function that returns a Flax linen module
`module(x [N, ...], train: bool) -> logits [N, num_classes]`. It is named
on the command line either by its registry name (`--model=resnet20`) or by
an import path `package.module:function` (`--model=my_package.nets:build`),
which trains a model bnjax has never seen, with no edit to bnjax.

The builder's keyword arguments declare which lab options it supports; the
lab passes each one it takes (`bnjax.lab.models.LabModel` builds the module):

- `norm`: a factory `norm(name=None) -> layer`, the layer called as
  `layer(x, use_running_average=...)`, built from `--norm` and its options
  (identity for `--norm=none`);
- `activation`: the activation function of `--activation`;
- `norm_position`: 'before_activation' | 'after_activation';
- `dropout`: a function `dropout(x, train) -> x` with the rate of
  `--dropout_rate` (which a sweep may vmap), and `dropout_placement`;
- `num_classes`: the number of labels of the data set;
- `conv_impl`: 'xla' | 'cpu_fast' (the lab's convolutions).

A lab option set to a non-default value whose builder does not take it is
refused in one line naming the flag. A registry entry adds fixed keyword
arguments (`options`: e.g. the depth), the data set its input must be, and
its own training settings, which become the run's defaults (`defaults`):
every flag still overrides them.

This module is light (no JAX or Flax at import): a registered builder is
itself an import path, imported when the model is built or its signature
checked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
from typing import Any, Callable, Mapping

# The lab options a builder may take, by their keyword argument: option name -> builder argument.
BUILDER_ARGUMENTS = {
    'norm': 'norm',
    'activation': 'activation',
    'norm_position': 'norm_position',
    'dropout_placement': 'dropout_placement',
    'dropout_rate': 'dropout',
    'conv_impl': 'conv_impl',
}
# Arguments the lab passes when a builder takes them, though no flag sets them.
LAB_ARGUMENTS = tuple(BUILDER_ARGUMENTS.values()) + ('num_classes',)
IMPORT_PATH = re.compile(r'^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$')


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered model.

  Attributes:
    name: `--model` value.
    build: the builder's import path, `package.module:function`.
    description: one line.
    options: fixed keyword arguments of the builder (e.g. `depth=20`).
    train: the model's own training settings (option name -> value): the
      run's defaults when `--model` names it.
    dataset: the data set its input must be (None: any image size).
    widths: the features of its norm layers, where known (checked against
      `--num_groups` before any data loads).
  """

  name: str
  build: str
  description: str
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dataset: str | None = None
  widths: tuple[int, ...] = ()


# He et al. 2016's CIFAR-10 recipe (section 4.2) as the lab's options: SGD with momentum 0.9, lr 0.1 divided by 10
# at 50% and 75% of training (theirs: at 32k and 48k of 64k iterations), weight decay 1e-4, batch 128, 4-pixel-pad
# crops and flips, per-channel standardization; 182 epochs ~ 64k iterations of 128 on 45k/50k images. BN momentum
# 0.9 and epsilon 1e-5 as PyTorch's BatchNorm2d (the common reproduction).
RESNET_CIFAR_RECIPE = dict(
    dataset='cifar10', scaling='standardize', augment=True, optimizer='momentum', optimizer_momentum=0.9,
    learning_rate=0.1, lr_schedule='step', weight_decay=1e-4, batch_size=128, epochs=182, momentum=0.9,
    epsilon=1e-5, conv_impl='cpu_fast',
)

_SEED = 'bnjax.lab.models'
ENTRIES: dict[str, Entry] = {entry.name: entry for entry in (
    Entry('mnist_mlp', f'{_SEED}:mlp', 'MNIST MLP of the source: Dense 256, 128, 512, 64, 128, 256, each with norm '
          'and activation.', options=dict(widths=(256, 128, 512, 64, 128, 256)),
          train=dict(dataset='mnist', optimizer='adam', learning_rate=1e-3, batch_size=500, epochs=20),
          widths=(256, 128, 512, 64, 128, 256)),
    Entry('cifar_cnn', f'{_SEED}:cnn', 'CIFAR-10 CNN of the source: 3 x (2 x Conv3x3 block, MaxPool 2) with 32, 64, '
          '128 channels, Dense 256 block.', options=dict(channels=(32, 64, 128), dense=256),
          train=dict(dataset='cifar10', optimizer='adam', learning_rate=1e-4, batch_size=32, epochs=30),
          dataset='cifar10', widths=(32, 32, 64, 64, 128, 128, 256)),
    # "weights initialized to small random Gaussian values": Flax's lecun_normal. Section 4.1 gives SGD, 50,000
    # steps of 60 examples; the learning rate is not stated: 0.1 is ours.
    Entry('mlp_bn_paper', f'{_SEED}:mlp', 'Ioffe & Szegedy 2015, section 4.1: 3 Dense 100 sigmoid blocks.',
          options=dict(widths=(100, 100, 100), kernel_init='lecun_normal'),
          train=dict(dataset='mnist', optimizer='sgd', learning_rate=0.1, batch_size=60, steps=50_000,
                     activation='sigmoid'), widths=(100, 100, 100)),
    *(Entry(f'resnet{depth}', 'bnjax.lab.resnet:build', f'He et al. 2016 ResNet-{depth} for CIFAR-10 (option-A '
            f'shortcuts), with their recipe.', options=dict(depth=depth), train=RESNET_CIFAR_RECIPE,
            dataset='cifar10', widths=(16, 32, 64)) for depth in (20, 32, 56)),
)}


def names() -> tuple[str, ...]:
  """The registered model names."""
  return tuple(ENTRIES)


def is_import_path(model: str) -> bool:
  return bool(IMPORT_PATH.match(model))


def is_model(model: str) -> bool:
  """A registered name, or the form of an import path (whether it imports is checked by `resolve`)."""
  return isinstance(model, str) and (model in ENTRIES or is_import_path(model))


MODEL_EXPECTED = (f'a registered model ({", ".join(names())}) or the import path of a builder, '
                  'package.module:function')


def entry(model: str) -> Entry:
  """The registry entry of a name, or an entry made for an import path (its builder's own attributes:
  `lab_train` for training defaults, `lab_dataset`, as a registry entry's `train` and `dataset`)."""
  if model in ENTRIES:
    return ENTRIES[model]
  if not is_import_path(model):
    raise ValueError(f'--model={model!r} is invalid: expected {MODEL_EXPECTED}.')
  builder = _import(model)
  return Entry(model, model, getattr(builder, '__doc__', None) or model,
               train=dict(getattr(builder, 'lab_train', {})), dataset=getattr(builder, 'lab_dataset', None))


@functools.lru_cache(maxsize=None)
def _import(path: str) -> Callable:
  module_name, _, attribute = path.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    raise ValueError(f'--model={path}: cannot import {module_name} ({error}); the module must be importable '
                     '(on PYTHONPATH, or run from the folder that holds it).') from None
  except Exception as error:  # the user's module raised while importing
    raise ValueError(f'--model={path}: importing {module_name} raised {type(error).__name__}: {error}') from None
  builder = getattr(module, attribute, None)
  if builder is None:
    raise ValueError(f'--model={path}: {module_name} has no {attribute!r}; expected a builder function '
                     f'returning a Flax module.')
  if not callable(builder):
    raise ValueError(f'--model={path}: {module_name}.{attribute} is a {type(builder).__name__}, not a builder '
                     'function returning a Flax module.')
  return builder


def builder(model: str) -> Callable:
  """The builder function of a model (imported)."""
  return _import(entry(model).build)


@functools.lru_cache(maxsize=None)
def builder_arguments(model: str) -> frozenset[str]:
  """The keyword arguments the model's builder takes (every lab argument when it takes `**kwargs`)."""
  parameters = inspect.signature(builder(model)).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return frozenset(LAB_ARGUMENTS)
  return frozenset(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def takes(model: str, option: str) -> bool:
  """Whether the model's builder takes lab option `option` (True when the model does not resolve:
  `resolve` reports that)."""
  try:
    return BUILDER_ARGUMENTS[option] in builder_arguments(model)
  except ValueError:
    return True


def resolve(model: str) -> Entry:
  """The model's entry, its builder imported and checked; ValueError in one line naming `--model`."""
  found = entry(model)
  arguments = builder_arguments(model)
  fixed = set(found.options) - arguments
  if fixed:
    raise ValueError(f'--model={model}: its builder takes no {sorted(fixed)} (the registry entry sets them).')
  return found


def defaults(model: str) -> dict:
  """The model's own training settings (the run's defaults when `--model` names it), a fresh dict."""
  return dict(entry(model).train)
