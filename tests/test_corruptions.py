"""The corrupted test sets (bnjax.lab.data.corruptions): determinism, shapes, severity, and a few
corruptions against direct computations (numpy, scipy.ndimage, PIL, colorsys); TFDS under mock_data."""

import colorsys

import jax
import numpy as np
import pytest
import scipy.ndimage

from bnjax.lab import config as config_lib
from bnjax.lab import corruption_table as table
from bnjax.lab.data import corruptions

RNG = np.random.default_rng(0)
CIFAR_IMAGES = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
# Digit-like strokes: smoothed sparse dots (a rotation moves them further the larger its angle).
MNIST_IMAGES = np.clip(scipy.ndimage.gaussian_filter((RNG.random((6, 28, 28, 1)) < 0.03) * 2000.0, (0, 1.5, 1.5, 0)),
                       0, 255).astype(np.uint8)


def test_deterministic_per_seed_and_image():
  a = corruptions.corrupt(CIFAR_IMAGES, table.CIFAR, 'gaussian_noise', 3, seed=1)
  b = corruptions.corrupt(CIFAR_IMAGES, table.CIFAR, 'gaussian_noise', 3, seed=1, chunk=4)  # other batching
  c = corruptions.corrupt(CIFAR_IMAGES, table.CIFAR, 'gaussian_noise', 3, seed=2)
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)
  assert a.dtype == np.uint8 and a.shape == CIFAR_IMAGES.shape


@pytest.mark.parametrize('dataset,name', [(table.CIFAR, 'impulse_noise'), (table.CIFAR, 'contrast'),
                                          (table.MNIST, 'brightness'), (table.MNIST, 'rotate')])
def test_shapes_dtypes_and_distortion_grows_with_severity(dataset, name):
  images = CIFAR_IMAGES if dataset == table.CIFAR else MNIST_IMAGES
  distortion = []
  for severity in (1, 3, 5):
    out = corruptions.corrupt(images, dataset, name, severity)
    assert out.dtype == np.uint8 and out.shape == images.shape
    distortion.append(np.abs(out.astype(float) - images).mean())
  assert distortion[0] < distortion[1] < distortion[2], distortion


def test_gaussian_blur_is_scipy_gaussian_filter_nearest():
  sigma = corruptions.CIFAR_PARAMS['gaussian_blur'][4]
  x = CIFAR_IMAGES / 255.0
  want = np.stack([scipy.ndimage.gaussian_filter(x[..., c], sigma=(0, sigma, sigma), mode='nearest', truncate=4.0)
                   for c in range(3)], -1)
  got = corruptions.corrupt(CIFAR_IMAGES, table.CIFAR, 'gaussian_blur', 5)
  np.testing.assert_allclose(got, np.floor(np.clip(want, 0, 1) * 255), atol=1)


def test_contrast_and_brightness_against_numpy_and_colorsys():
  x = CIFAR_IMAGES / 255.0
  c = corruptions.CIFAR_PARAMS['contrast'][4]
  means = x.mean(axis=(1, 2), keepdims=True)
  want = np.floor(np.clip((x - means) * c + means, 0, 1) * 255)
  np.testing.assert_allclose(corruptions.corrupt(CIFAR_IMAGES, table.CIFAR, 'contrast', 5), want, atol=1)
  b = corruptions.CIFAR_PARAMS['brightness'][4]
  pixels = x[:2].reshape(-1, 3)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
  hsv[:, 2] = np.clip(hsv[:, 2] + b, 0, 1)
  rgb = np.array([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(x[:2].shape)
  got = corruptions.corrupt(CIFAR_IMAGES[:2], table.CIFAR, 'brightness', 5)
  np.testing.assert_allclose(got, np.floor(np.clip(rgb, 0, 1) * 255), atol=1)


def test_pixelate_is_pil_box_resize_and_zoom_blur_is_scipy_zoom():
  from PIL import Image

  c = corruptions.CIFAR_PARAMS['pixelate'][4]
  want = [np.asarray(Image.fromarray(im).resize((int(32 * c),) * 2, Image.BOX).resize((32, 32), Image.BOX))
          for im in CIFAR_IMAGES[:2]]
  np.testing.assert_allclose(corruptions.corrupt(CIFAR_IMAGES[:2], table.CIFAR, 'pixelate', 5), want, atol=1)

  x = CIFAR_IMAGES[0] / 255.0
  zooms = corruptions.CIFAR_PARAMS['zoom_blur'][0]
  out = np.zeros_like(x)
  for z in zooms:
    crop = int(np.ceil(32 / z))
    top = (32 - crop) // 2
    zoomed = scipy.ndimage.zoom(x[top:top + crop, top:top + crop], (z, z, 1), order=1)
    trim = (zoomed.shape[0] - 32) // 2
    out += zoomed[trim:trim + 32, trim:trim + 32]
  want = np.floor(np.clip((x + out) / (len(zooms) + 1), 0, 1) * 255)
  np.testing.assert_allclose(corruptions.corrupt(CIFAR_IMAGES[:1], table.CIFAR, 'zoom_blur', 1)[0], want, atol=1)


def _elastic_with_scipy(image, shifts, noise_x, noise_y, alpha, sigma):
  """make_cifar_c.py's elastic_transform given its draws, in numpy/scipy: OpenCV's warpAffine (bilinear,
  reflect-101) as map_coordinates with mode 'mirror' at the inverse affine map."""
  h, w = image.shape[:2]
  center, square = np.float32([h, w]) // 2, min(h, w) // 3
  src = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
  dst = src + shifts
  inverse = np.linalg.solve(np.concatenate([dst, np.ones((3, 1))], 1), src).T  # (x, y, 1) -> source (x, y)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  src_x = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
  src_y = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
  warped = np.stack([scipy.ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1, mode='mirror')
                     for c in range(image.shape[2])], -1)
  smooth = lambda noise: scipy.ndimage.gaussian_filter(noise, sigma, mode='reflect', truncate=3) * alpha if alpha \
      else np.zeros_like(noise)
  dy, dx = smooth(noise_y), smooth(noise_x)
  out = np.stack([scipy.ndimage.map_coordinates(warped[..., c], [rows + dy, cols + dx], order=1, mode='reflect')
                  for c in range(image.shape[2])], -1)
  return np.clip(out, 0, 1)


@pytest.mark.parametrize('severity', [1, 2, 5])
def test_elastic_transform_is_the_published_definition_in_scipy(severity):
  alpha, sigma, affine = corruptions.CIFAR_PARAMS['elastic_transform'][severity - 1]
  rng = np.random.default_rng(severity)
  x = CIFAR_IMAGES[:3] / np.float32(255)
  shifts = rng.uniform(-affine, affine, (3, 3, 2)).astype(np.float32)
  noise = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  got = jax.vmap(lambda *a: corruptions.elastic_transform(*a, alpha, sigma))(x, shifts, noise[0], noise[1])
  want = np.stack([_elastic_with_scipy(x[i], shifts[i], noise[0, i], noise[1, i], alpha, sigma) for i in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(got - x).mean() > 0.01  # it moved the image
  corrupted = corruptions.corrupt(CIFAR_IMAGES[:2], table.CIFAR, 'elastic_transform', severity)
  assert corrupted.shape == CIFAR_IMAGES[:2].shape and corrupted.dtype == np.uint8


def _imagemagick_motion_blur(image, radius, sigma, angle):
  """ImageMagick 6's MotionBlurImage in numpy (float64): a half-Gaussian kernel of 2 ceil(radius) + 1 taps at
  integer offsets along the angle, edge pixels repeated."""
  width = int(2 * np.ceil(radius) + 1)
  taps = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
  taps /= taps.sum()
  h, w = image.shape[:2]
  out = np.zeros(image.shape)
  for i in range(width):
    dx = int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5))
    dy = int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5))
    out += taps[i] * image[np.clip(np.arange(h) + dy, 0, h - 1)][:, np.clip(np.arange(w) + dx, 0, w - 1)]
  return out


@pytest.mark.parametrize('dataset,severity,angle', [(table.CIFAR, 1, -31.0), (table.CIFAR, 5, 41.0),
                                                    (table.MNIST, 5, 12.5)])
def test_motion_blur_is_imagemagicks_kernel(dataset, severity, angle):
  images = CIFAR_IMAGES[:2] if dataset == table.CIFAR else MNIST_IMAGES[:2]
  params = corruptions.CIFAR_PARAMS if dataset == table.CIFAR else corruptions.MNIST_PARAMS
  radius, sigma = params['motion_blur'][severity - 1]
  x = images / np.float32(255)
  got = jax.vmap(lambda image: corruptions.motion_blur(image, radius, sigma, angle))(x)
  want = np.stack([_imagemagick_motion_blur(image, radius, sigma, angle) for image in x])
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(got - x).mean() > 0.01
  assert corruptions.corrupt(images, dataset, 'motion_blur', severity).shape == images.shape


def test_snow_is_the_published_definition_in_scipy():
  c = corruptions.CIFAR_PARAMS['snow'][3]  # zoom 2.25: the layer is zoomed
  rng = np.random.default_rng(4)
  x = CIFAR_IMAGES[:2] / np.float32(255)
  noise = rng.normal(size=(2, 32, 32)).astype(np.float32)
  angles = np.float32([-100.0, -60.0])
  got = jax.vmap(lambda image, n, a: corruptions.snow(image, n, a, *c))(x, noise, angles)
  for i in range(2):
    layer = c[0] + c[1] * noise[i]
    crop = int(np.ceil(32 / c[2]))
    top = (32 - crop) // 2
    zoomed = scipy.ndimage.zoom(layer[top:top + crop, top:top + crop], c[2], order=1)
    trim = (zoomed.shape[0] - 32) // 2
    layer = zoomed[trim:trim + 32, trim:trim + 32]
    layer = np.floor(np.clip(np.where(layer < c[3], 0, layer), 0, 1) * 255)
    layer = np.floor(_imagemagick_motion_blur(layer[..., None], c[4], c[5], angles[i]) + 1e-6) / 255
    gray = (x[i] @ np.float32([0.299, 0.587, 0.114]))[..., None]
    image = c[6] * x[i] + (1 - c[6]) * np.maximum(x[i], gray * 1.5 + 0.5)
    want = np.clip(image + layer + np.rot90(layer, 2), 0, 1)
    assert np.mean(np.abs(got[i] - want) > 1e-4) < 0.01  # the 8-bit floors may differ where a sum is a whole number
    np.testing.assert_allclose(np.median(np.abs(got[i] - want)), 0, atol=1e-5)
  assert np.mean(np.asarray(got) > x + 0.05) > 0.05  # snow brightens


def test_mnist_translate_shifts_and_stripe_inverts():
  out = corruptions.corrupt(MNIST_IMAGES[:1], table.MNIST, 'translate', 2)[0, ..., 0].astype(int)
  image = MNIST_IMAGES[0, ..., 0].astype(int)
  shifts = [(dy, dx) for dy in (-2, 2) for dx in (-2, 2)]
  shifted = [np.roll(np.pad(image, 2), (-dy, -dx), axis=(0, 1))[2:-2, 2:-2] for dy, dx in shifts]
  assert any(np.array_equal(out, s) for s in shifted)
  stripe = corruptions.corrupt(MNIST_IMAGES[:1], table.MNIST, 'stripe', 1)[0, ..., 0].astype(int)
  np.testing.assert_array_equal(stripe[:, :7], 255 - image[:, :7])
  np.testing.assert_array_equal(stripe[:, 7:21], image[:, 7:21])


def test_bad_names_and_severities_are_one_line_naming_the_flag():
  for settings, flag in (({'corruption': 'frost'}, '--corruption'), ({'corruption': 'nope'}, '--corruption'),
                         ({'corruption': 'fog', 'severity': 0}, '--severity')):
    with pytest.raises(ValueError, match=flag) as error:
      config_lib.make({'dataset': 'cifar10_corrupted', 'model': 'cifar_cnn', **settings})
    assert '\n' not in str(error.value)


def test_read_corrupted_from_tfds_under_mock_data(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=8):
    raw = corruptions.read_corrupted(table.CIFAR, 'fog', 5, source='tfds', data_dir=tmp_path)
  assert raw.source.startswith('tfds:cifar10_corrupted/fog_5@')
  assert raw.test_images.shape == (8, 32, 32, 3) and raw.test_images.dtype == np.uint8
  assert raw.train_images.shape[1:] == (32, 32, 3)
  with pytest.raises(ValueError, match='--severity'):
    corruptions.tfds_config(table.MNIST, 'shot_noise', 3)


def test_every_corruption_names_a_tfds_config():
  import tensorflow_datasets as tfds

  for dataset in (table.CIFAR, table.MNIST):
    configs = {config.name for config in tfds.builder_cls(dataset).BUILDER_CONFIGS}
    for name in table.names(dataset):
      severity = table.MNIST_C_SEVERITY.get(name, 1) if dataset == table.MNIST else 3
      assert corruptions.tfds_config(dataset, name, severity).split('/')[1] in configs, name
