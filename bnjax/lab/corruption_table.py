"""Which corruptions each corrupted data set has, and their published severity parameters (no JAX here).

CIFAR-10-C (Hendrycks & Dietterich 2019, `make_cifar_c.py`) and MNIST-C (Mu & Gilmer 2019,
google-research/mnist-c `corruptions.py`) define each corruption by a function and a table of five
severity parameters. This module holds the names and how each is produced here, so that flags are
checked before any heavy import; `bnjax.lab.data.corruptions` implements them.

How a corruption is produced (`HOW[dataset][name]`):
- 'exact': the published definition and parameters, computed in JAX (per image, its own random key);
  the same distribution as the published generator, not the same random draws (those came from
  numpy's global generator).
- 'exact_host': computed on the host with the same library the definition calls (PIL for JPEG).
- left out (not in `HOW`): see `LEFT_OUT` for why.
"""

from __future__ import annotations

CIFAR = 'cifar10_corrupted'
MNIST = 'mnist_corrupted'
CLEAN = {CIFAR: 'cifar10', MNIST: 'mnist'}

HOW: dict[str, dict[str, str]] = {
    CIFAR: {name: 'exact' for name in (
        'gaussian_noise', 'shot_noise', 'impulse_noise', 'speckle_noise', 'gaussian_blur', 'defocus_blur',
        'glass_blur', 'zoom_blur', 'contrast', 'brightness', 'saturate', 'pixelate', 'fog', 'elastic_transform',
        'motion_blur', 'snow')}
    | {'jpeg_compression': 'exact_host'},
    MNIST: {name: 'exact' for name in (
        'shot_noise', 'impulse_noise', 'glass_blur', 'motion_blur', 'shear', 'scale', 'rotate', 'brightness',
        'translate', 'stripe', 'fog', 'spatter', 'dotted_line', 'zigzag')},
}

LEFT_OUT: dict[str, dict[str, str]] = {
    CIFAR: {
        'frost': 'needs the frost image assets of the robustness repository',
        'spatter': "severities 1-3 need OpenCV's Canny, distance transform and histogram equalization",
    },
    MNIST: {
        'canny_edges': "needs scikit-image's Canny edge detector (hysteresis thresholds, its own smoothing)",
    },
}

# MNIST-C uses one severity per corruption (its functions' defaults); the TFDS `mnist_corrupted` configs
# are these. `--severity` picks another row of the same table; corruptions without a table have one level.
MNIST_C_SEVERITY = {'shot_noise': 5, 'impulse_noise': 4, 'glass_blur': 1, 'motion_blur': 1, 'shear': 2,
                    'scale': 3, 'rotate': 2, 'brightness': 5, 'translate': 3, 'fog': 5, 'spatter': 4}
ONE_LEVEL = ('stripe', 'dotted_line', 'zigzag', 'canny_edges')
SEVERITIES = (1, 2, 3, 4, 5)


def names(dataset: str) -> tuple[str, ...]:
  """The corruptions this lab can produce for `dataset` (generated or, with TFDS, read)."""
  return tuple(HOW.get(dataset, {}))


def is_corrupted(dataset: str) -> bool:
  return dataset in CLEAN


def check(dataset: str, corruption: str | None, severity: int) -> None:
  """Raises ValueError, one line naming the flag, for a corruption or severity `dataset` lacks."""
  if not is_corrupted(dataset):
    return
  if corruption not in HOW[dataset]:
    why = LEFT_OUT[dataset].get(corruption)
    detail = f' ({corruption} is left out: {why})' if why else ''
    raise ValueError(f'--corruption={corruption!r} is invalid with --dataset={dataset}: expected one of '
                     f'{", ".join(HOW[dataset])}{detail}.')
  if severity not in SEVERITIES:
    raise ValueError(f'--severity={severity!r} is invalid: expected an integer in 1..5.')
