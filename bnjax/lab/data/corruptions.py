"""Corrupted test sets (CIFAR-10-C, MNIST-C) generated from the clean ones, on device.

    corrupted = corrupt(images, 'cifar10_corrupted', 'fog', severity=5, seed=0)   # uint8 [N, 32, 32, 3]

Each corruption follows its published definition and severity table (Hendrycks & Dietterich 2019,
`make_cifar_c.py`; Mu & Gilmer 2019, mnist-c `corruptions.py`; the tables are reproduced below),
written here in JAX: one jitted, vmapped function per corruption and severity, every image with its
own key `fold_in(PRNGKey(seed), index)`, so that the result depends on the seed and the image only
(not on batching or the device). Images go in and come out as uint8 `[N, H, W, C]` in [0, 255],
truncated to integers as the published sets were saved (`np.uint8(x)`). Which corruptions are
left out, and why: `bnjax.lab.corruption_table.LEFT_OUT`.

The definitions call scikit-image, OpenCV and SciPy; where they do, the function here computes the
same formula: `skimage.filters.gaussian` (truncate 4, mode 'nearest') as a separable filter,
OpenCV's `filter2D` (reflect-101 border) as a correlation, `scipy.ndimage.zoom(order=1)` as linear
interpolation matrices, PIL's BOX resize with its weights and 8-bit rounding per pass, the HSV
round trips of brightness and saturation in closed form (with hue and value fixed, each RGB channel
is `v * (1 - s * k)` with k a function of hue only), `skimage.transform.warp(order=1)` as
bilinear sampling with zeros outside, OpenCV's `warpAffine` as bilinear sampling with reflect-101 borders,
and `scipy.ndimage.map_coordinates(order=1, mode='reflect')` with symmetric borders. Random draws come from JAX, not numpy's global generator: the
same distributions, not the published sets' pixels.
"""

from __future__ import annotations

import functools
import io


import jax
import jax.numpy as jnp
import numpy as np

from bnjax.lab import corruption_table as table

Array = jnp.ndarray

# ----------------------------------------------------------------------------
# Severity parameters, as published (index severity - 1).

CIFAR_PARAMS = {
    'gaussian_noise': [0.04, 0.06, .08, .09, .10],
    'shot_noise': [500, 250, 100, 75, 50],
    'impulse_noise': [.01, .02, .03, .05, .07],
    'speckle_noise': [.06, .1, .12, .16, .2],
    'gaussian_blur': [.4, .6, 0.7, .8, 1],
    'glass_blur': [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    'defocus_blur': [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    'zoom_blur': [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    'fog': [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    'contrast': [.75, .5, .4, .3, 0.15],
    'brightness': [.05, .1, .15, .2, .3],
    'saturate': [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    'jpeg_compression': [80, 65, 58, 50, 40],
    'pixelate': [0.95, 0.9, 0.85, 0.75, 0.65],
    'motion_blur': [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    # (loc, scale, zoom, threshold, motion-blur radius, sigma, weight kept of the image)
    'snow': [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    # (alpha, sigma, affine) as fractions of the image size 32
    'elastic_transform': [tuple(32 * v for v in c) for c in
                          ((0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05), (.1, .03, .03))],
}
MNIST_PARAMS = {
    'shot_noise': [60, 25, 12, 5, 3],
    'impulse_noise': [.03, .06, .09, 0.17, 0.27],
    'glass_blur': [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    'fog': [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)],
    'spatter': [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    'brightness': [.1, .2, .3, .4, .5],
    'shear': [0.2, 0.4, 0.6, 0.8, 1.],
    'rotate': [0.2, 0.4, 0.6, 0.8, 1.],
    'scale': [1 / .9, 1 / .8, 1 / .7, 1 / .6, 1 / .5],
    'translate': [1, 2, 3, 4, 5],
    'motion_blur': [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
}
FOG_MAPSIZE = {table.CIFAR: 32, table.MNIST: 256}

# ----------------------------------------------------------------------------
# Filters (x: one image [H, W, C] float32 in [0, 1]).


def gaussian_taps(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """The 1-D kernel of `scipy.ndimage.gaussian_filter` (radius int(truncate * sigma + 0.5))."""
  radius = int(truncate * float(sigma) + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / float(sigma)) ** 2)
  return taps / taps.sum()


def _correlate_axis(x: Array, taps: np.ndarray, axis: int, mode: str) -> Array:
  radius = len(taps) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(x, pad, mode=mode)
  size = x.shape[axis]
  return sum(float(w) * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i, w in enumerate(taps))


def gaussian_blur(x: Array, sigma: float) -> Array:
  """`skimage.filters.gaussian(x, sigma, multichannel=True)`: mode 'nearest', truncate 4, per channel."""
  taps = gaussian_taps(sigma)
  return _correlate_axis(_correlate_axis(x, taps, 0, 'edge'), taps, 1, 'edge')


def _cv2_gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
  center = (ksize - 1) / 2
  taps = np.exp(-((np.arange(ksize) - center) ** 2) / (2 * sigma * sigma))
  return taps / taps.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """The `disk` of make_cifar_c.py: a normalized aliased disk (17 x 17 up to radius 8), then OpenCV's
  Gaussian blur (3 x 3 up to radius 8, else 5 x 5; reflect-101 border) with sigma `alias_blur`."""
  span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
  ksize = 3 if radius <= 8 else 5
  xx, yy = np.meshgrid(span, span)
  disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  taps = _cv2_gaussian_taps(ksize, alias_blur)
  r = ksize // 2
  padded = np.pad(disk, r, mode='reflect')
  rows = sum(w * padded[i:i + disk.shape[0], :] for i, w in enumerate(taps))
  return sum(w * rows[:, i:i + disk.shape[1]] for i, w in enumerate(taps)).astype(np.float32)


def filter2d(x: Array, kernel: np.ndarray) -> Array:
  """OpenCV `filter2D(x, -1, kernel)` per channel: correlation, anchor at the center, reflect-101 border."""
  r0, r1 = kernel.shape[0] // 2, kernel.shape[1] // 2
  h, w = x.shape[:2]
  padded = jnp.pad(x, ((r0, r0), (r1, r1), (0, 0)), mode='reflect')
  out = jnp.zeros_like(x)
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      if kernel[i, j] != 0:
        out = out + float(kernel[i, j]) * padded[i:i + h, j:j + w]
  return out


def linear_zoom_matrix(size_in: int, size_out: int) -> np.ndarray:
  """`[size_out, size_in]` weights of `scipy.ndimage.zoom(order=1)` along one axis (grid_mode False:
  output o samples input o * (size_in - 1) / (size_out - 1))."""
  matrix = np.zeros((size_out, size_in))
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  for o in range(size_out):
    pos = o * scale
    lo = min(int(np.floor(pos)), size_in - 1)
    frac = pos - lo
    matrix[o, lo] += 1 - frac
    if frac > 0:
      matrix[o, lo + 1] += frac
  return matrix


def clipped_zoom_matrix(size: int, zoom: float) -> np.ndarray:
  """`[size, size]`: the `clipped_zoom` of the definitions along one axis (center crop of
  ceil(size / zoom), linear zoom to round(crop * zoom), center trim back to size)."""
  crop = int(np.ceil(size / zoom))
  top = (size - crop) // 2
  zoomed = int(round(crop * zoom))
  matrix = np.zeros((zoomed, size))
  matrix[:, top:top + crop] = linear_zoom_matrix(crop, zoomed)
  trim = (zoomed - size) // 2
  return matrix[trim:trim + size]


def pil_box_matrix(size_in: int, size_out: int) -> np.ndarray:
  """`[size_out, size_in]` weights of PIL's BOX resampling (pixel centers inside each output box)."""
  scale = size_in / size_out
  support = 0.5 * max(scale, 1.0)
  inverse = 1.0 / max(scale, 1.0)
  matrix = np.zeros((size_out, size_in))
  for o in range(size_out):
    center = (o + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), size_in)
    weights = np.array([1.0 if -0.5 <= (j - center + 0.5) * inverse < 0.5 else 0.0 for j in range(lo, hi)])
    matrix[o, lo:hi] = weights / weights.sum()
  return matrix


def _resize_box_uint8(x255: Array, rows: np.ndarray, cols: np.ndarray) -> Array:
  """PIL's BOX resize of 8-bit pixels: horizontal pass, rounded to 8 bits, then vertical, rounded."""
  horizontal = jnp.clip(jnp.round(jnp.einsum('ow,hwc->hoc', jnp.asarray(cols, jnp.float32), x255)), 0, 255)
  return jnp.clip(jnp.round(jnp.einsum('oh,hwc->owc', jnp.asarray(rows, jnp.float32), horizontal)), 0, 255)


def plasma_fractal(key: Array, mapsize: int, wibbledecay: float) -> Array:
  """The diamond-square height map of the definitions, `[mapsize, mapsize]` in [0, 1]."""
  grid = jnp.zeros((mapsize, mapsize), jnp.float32)
  step, wibble = mapsize, 100.0
  while step >= 2:
    half = step // 2
    key, k1, k2, k3 = jax.random.split(key, 4)

    def wibbled(array, k, wibble=wibble):
      return array / 4 + wibble * jax.random.uniform(k, array.shape, minval=-wibble, maxval=wibble)

    corners = grid[0::step, 0::step]
    squares = corners + jnp.roll(corners, -1, axis=0)
    squares = squares + jnp.roll(squares, -1, axis=1)
    grid = grid.at[half::step, half::step].set(wibbled(squares, k1))
    centers = grid[half::step, half::step]
    corners = grid[0::step, 0::step]
    lt = centers + jnp.roll(centers, 1, axis=0) + corners + jnp.roll(corners, -1, axis=1)
    grid = grid.at[0::step, half::step].set(wibbled(lt, k2))
    tt = centers + jnp.roll(centers, 1, axis=1) + corners + jnp.roll(corners, -1, axis=0)
    grid = grid.at[half::step, 0::step].set(wibbled(tt, k3))
    step //= 2
    wibble /= wibbledecay
  grid = grid - grid.min()
  return grid / grid.max()


def _border_index(i: Array, size: int, border: str) -> Array:
  """Integer positions `i` (as floats) folded into [0, size) by `border`: 'reflect_101' (OpenCV's
  BORDER_REFLECT_101, scipy's 'mirror': d c b | a b c d | c b a), 'symmetric' (scipy's 'reflect':
  b a | a b c d | d c), anything else clipped (its weight is zeroed by the caller for 'zeros')."""
  if border == 'reflect_101':
    period = 2 * (size - 1)
    i = jnp.mod(i, period)
    i = jnp.where(i > size - 1, period - i, i)
  elif border == 'symmetric':
    period = 2 * size
    i = jnp.mod(i, period)
    i = jnp.where(i >= size, period - 1 - i, i)
  return jnp.clip(i, 0, size - 1).astype(jnp.int32)


def bilinear_sample(x: Array, rows: Array, cols: Array, border: str = 'zeros') -> Array:
  """x `[H, W, C]` sampled bilinearly at `(rows, cols)` (any equal shapes S): `[*S, C]`. Each of the four
  neighbours outside the image is 0 (`border='zeros'`, skimage's warp with cval 0) or the pixel that
  `border` folds it onto ('reflect_101', 'symmetric'; see `_border_index`)."""
  h, w = x.shape[:2]
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  out = jnp.zeros(rows.shape + x.shape[2:], x.dtype)
  for dr in (0, 1):
    for dc in (0, 1):
      rr, cc = r0 + dr, c0 + dc
      weight = (1 - jnp.abs(rows - rr)) * (1 - jnp.abs(cols - cc))
      if border == 'zeros':
        weight = jnp.where((rr >= 0) & (rr <= h - 1) & (cc >= 0) & (cc <= w - 1), weight, 0.0)
      pixel = x[_border_index(rr, h, border), _border_index(cc, w, border)]
      out = out + weight[..., None] * pixel
  return out


def bilinear_warp(x: Array, inverse: np.ndarray | Array, border: str = 'zeros') -> Array:
  """`skimage.transform.warp(x, inverse_map, order=1)` (zeros outside; or another `border`): output pixel
  (col, row) takes the bilinear sample of x at `inverse @ (col, row, 1)`. x `[H, W, C]`."""
  h, w = x.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
  src_c = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
  src_r = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
  return bilinear_sample(x, src_r, src_c, border)


def affine_from_points(src: Array, dst: Array) -> Array:
  """OpenCV's `getAffineTransform`: the `[2, 3]` matrix that maps the three points `src [3, 2]` (x, y) onto
  `dst [3, 2]`."""
  points = jnp.concatenate([src, jnp.ones((3, 1), src.dtype)], axis=1)
  return jnp.linalg.solve(points, dst).T


def _centered_affine(matrix: Array, size: int) -> Array:
  """`matrix` [2, 2] with the translation that keeps the image center ((size - 1) / 2) fixed."""
  center = (size - 1) / 2
  shift = center * (1 - matrix[:, 0] - matrix[:, 1])
  return jnp.concatenate([matrix, shift[:, None]], axis=1)


def line_from_points(c0, r0, c1, r1, size: int = 28) -> Array:
  """mnist-c's `line_from_points`: a line of log-decaying intensity from (c0, r0) to (c1, r1), `[size, size]`."""
  cc = jnp.arange(size, dtype=jnp.float32)[None, :]
  rr = jnp.arange(size, dtype=jnp.float32)[:, None]
  slope = (r1 - r0) / jnp.where(c1 == c0, 1.0, c1 - c0)
  dist = jnp.clip(jnp.abs(rr - (slope * (cc - c0) + r0)), 0, 2.3 - 1e-10)
  line = jnp.clip(jnp.log(1 - dist / 2.3) + 1, 0, 1)
  line = jnp.where((cc >= jnp.floor(c0)) & (cc < jnp.ceil(c1)), line, 0.0)
  return jnp.where(c1 == c0, 0.0, line)


# ----------------------------------------------------------------------------
# The corruptions: (key, x [H, W, C] float in [0, 1], parameter) -> float in [0, 1] (x 255 before saving).


def _hsv_value_saturation(x):
  v = x.max(-1, keepdims=True)
  delta = v - x.min(-1, keepdims=True)
  s = jnp.where(delta > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
  return v, s


def brightness_rgb(x: Array, c: float) -> Array:
  """rgb -> hsv, v = clip(v + c, 0, 1), -> rgb: with hue and saturation fixed every channel scales with v;
  black (v = 0, so s = 0, hue 0) becomes gray v'."""
  v, _ = _hsv_value_saturation(x)
  v_new = jnp.clip(v + c, 0, 1)
  return jnp.where(v > 0, x * v_new / jnp.where(v > 0, v, 1.0), v_new)


def saturate_rgb(x: Array, factor: float, offset: float) -> Array:
  """rgb -> hsv, s = clip(s * factor + offset, 0, 1), -> rgb: channel = v - (v - channel) * s' / s; a gray
  pixel (s = 0, hue 0 in scikit-image) becomes (v, v (1 - s'), v (1 - s'))."""
  v, s = _hsv_value_saturation(x)
  s_new = jnp.clip(s * factor + offset, 0, 1)
  colored = v - (v - x) * s_new / jnp.where(s > 0, s, 1.0)
  gray = jnp.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=-1)
  return jnp.where(s > 0, colored, gray)


def _salt_and_pepper(key, x, amount):
  k1, k2 = jax.random.split(key)
  flipped = jax.random.uniform(k1, x.shape) < amount
  salted = jax.random.uniform(k2, x.shape) < 0.5
  return jnp.where(flipped, jnp.where(salted, 1.0, 0.0), x)


def _glass_blur(key, x, sigma, delta, iterations, coin: bool):
  """Blur, floor to 8 bits, swap each pixel (bottom-right to top-left) with a random neighbour
  (dx, dy uniform in [-delta, delta); MNIST-C: each with probability 1/2), blur again."""
  h, w = x.shape[:2]
  x = jnp.floor(gaussian_blur(x, sigma) * 255) / 255
  positions = [(r, c) for r in range(h - delta, delta, -1) for c in range(w - delta, delta, -1)]
  rows = jnp.array([p[0] for p in positions], jnp.int32)
  cols = jnp.array([p[1] for p in positions], jnp.int32)
  count = len(positions)
  for it in range(iterations):
    k1, k2, key = jax.random.split(jax.random.fold_in(key, it), 3)
    shifts = jax.random.randint(k1, (count, 2), -delta, delta)
    swap = jax.random.bernoulli(k2, 0.5, (count,)) if coin else jnp.ones((count,), bool)

    def body(i, image):
      r, c = rows[i], cols[i]
      r2, c2 = r + shifts[i, 1], c + shifts[i, 0]
      a, b = image[r, c], image[r2, c2]
      image = image.at[r, c].set(jnp.where(swap[i], b, a))
      return image.at[r2, c2].set(jnp.where(swap[i], a, b))

    x = jax.lax.fori_loop(0, count, body, x)
  return jnp.clip(gaussian_blur(x, sigma), 0, 1)


def _fog(key, x, strength, decay, mapsize):
  h, w = x.shape[:2]
  max_val = x.max()
  x = x + strength * plasma_fractal(key, mapsize, decay)[:h, :w, None]
  return jnp.clip(x * max_val / (max_val + strength), 0, 1)


def _zoom_blur(x, zooms):
  size = x.shape[0]
  out = jnp.zeros_like(x)
  for zoom in zooms:
    m = jnp.asarray(clipped_zoom_matrix(size, float(zoom)), jnp.float32)
    out = out + jnp.einsum('ih,jw,hwc->ijc', m, m, x)
  return jnp.clip((x + out) / (len(zooms) + 1), 0, 1)


def _pixelate(x, c):
  size = x.shape[0]
  small = int(size * c)
  x255 = jnp.round(x * 255)  # PIL works on the 8-bit image
  down = _resize_box_uint8(x255, pil_box_matrix(size, small), pil_box_matrix(size, small))
  up = _resize_box_uint8(down, pil_box_matrix(small, size), pil_box_matrix(small, size))
  return up / 255


def _random_sign(key):
  return jnp.where(jax.random.bernoulli(key), 1.0, -1.0)


def _mnist_affine(name, key, x, c):
  size = x.shape[0]
  if name == 'translate':
    signs = jnp.stack([_random_sign(k) for k in jax.random.split(key)])
    inverse = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).at[:, 2].set(c * signs)
    return jnp.clip(bilinear_warp(x, inverse), 0, 1)
  if name == 'scale':
    matrix = jnp.array([[c, 0.0], [0.0, c]])
  else:
    angle = c * _random_sign(key)
    if name == 'rotate':
      matrix = jnp.array([[jnp.cos(angle), -jnp.sin(angle)], [jnp.sin(angle), jnp.cos(angle)]])
    else:  # shear, scikit-image's AffineTransform(shear=angle) of the MNIST-C era
      matrix = jnp.array([[1.0, -jnp.sin(angle)], [0.0, jnp.cos(angle)]])
  return jnp.clip(bilinear_warp(x, _centered_affine(matrix, size)), 0, 1)


def _zigzag(key, x):
  k1, k2 = jax.random.split(key)
  r0 = jax.random.randint(k1, (), 0, 27).astype(jnp.float32)
  r1 = r0 + jax.random.randint(k2, (), -5, 5).astype(jnp.float32)
  a, b, c0, c1 = 2.0, 2.0, 2.0, 25.0
  theta = jnp.arctan((r1 - r0) / (c1 - c0))
  d = (c1 - c0) / jnp.cos(theta)
  # |r1 - r0| <= 5 keeps d in [23, 23.6]: always six zigzag corners, then the end point (as defined).
  corners = [(0.0, 0.0)] + [((2 * i + 1) * a, (-1) ** i * b) for i in range(6)]
  max_c = (2 * a) * jnp.floor(d / (2 * a))
  points = jnp.array([[p[0] for p in corners], [p[1] for p in corners]])
  end = jnp.stack([d, corners[-1][1] / (2 * (d - max_c))])
  points = jnp.concatenate([points, end[:, None]], axis=1)
  rotation = jnp.array([[jnp.cos(theta), -jnp.sin(theta)], [jnp.sin(theta), jnp.cos(theta)]])
  cs, rs = rotation @ points
  cs, rs = cs + c0, rs + r0
  lines = sum(line_from_points(cs[i - 1], rs[i - 1], cs[i], rs[i]) for i in range(1, points.shape[1]))
  return jnp.clip(x + lines[..., None], 0, 1)


def _dotted_line(key, x):
  r0, r1 = jax.random.randint(key, (2,), 0, 27).astype(jnp.float32)
  line = line_from_points(0.0, r0, 27.0, r1)
  kept = (jnp.arange(28) // 2) % 2 == 1  # columns [0, 2), [4, 6), ... are switched off
  return jnp.clip(x + jnp.where(kept[None, :], line, 0.0)[..., None], 0, 1)


def _spatter_mud(key, x, loc, scale, sigma, threshold, mud_sigma):
  liquid = loc + scale * jax.random.normal(key, x.shape[:2])
  liquid = gaussian_blur(liquid[..., None], sigma)[..., 0]
  mask = (liquid > threshold).astype(jnp.float32)
  mask = gaussian_blur(mask[..., None], mud_sigma)
  mask = jnp.where(mask < 0.8, 0.0, mask)
  return jnp.clip(x * (1 - mask) + 63 / 255 * mask, 0, 1)


def motion_blur_taps(radius: float, sigma: float) -> np.ndarray:
  """ImageMagick 6's `MotionBlurImage` kernel: the half Gaussian exp(-i^2 / (2 sigma^2)), i = 0 .. 2 ceil(radius),
  normalized (`GetOptimalKernelWidth1D`'s width for radius > 0)."""
  taps = np.exp(-np.arange(int(2 * np.ceil(radius) + 1)) ** 2 / (2.0 * sigma * sigma))
  return taps / taps.sum()


def motion_blur(x: Array, radius: float, sigma: float, angle: Array) -> Array:
  """ImageMagick 6's `MotionBlurImage(radius, sigma, angle)` (what the definitions call through wand) of x
  `[H, W, C]`: output pixel (row, col) = sum_i taps[i] * x[row + dy_i, col + dx_i], the offsets
  `dx_i = ceil(i cos(angle) - 0.5)`, `dy_i = ceil(i sin(angle) - 0.5)` (angle in degrees), pixels beyond the
  edge repeating the edge (ImageMagick's default virtual pixels). ImageMagick's 8-bit result is the floor of
  this sum (checked against it), which `corrupt`'s truncation gives. The offsets are computed in float32
  (ImageMagick: double): they differ only at angles where `i sin(angle) - 0.5` rounds onto a whole number
  (e.g. exactly -30 degrees), which random angles almost never hit."""
  h, w = x.shape[:2]
  radians = jnp.deg2rad(angle)
  rows, cols = jnp.arange(h), jnp.arange(w)
  out = jnp.zeros_like(x)
  for i, tap in enumerate(motion_blur_taps(radius, sigma)):
    dy = jnp.ceil(i * jnp.sin(radians) - 0.5).astype(jnp.int32)
    dx = jnp.ceil(i * jnp.cos(radians) - 0.5).astype(jnp.int32)
    out = out + float(tap) * x[jnp.clip(rows + dy, 0, h - 1)][:, jnp.clip(cols + dx, 0, w - 1)]
  return out


def _snow(key, x, *c):
  """make_cifar_c.py's `snow`, its random draws from `key` (see `snow`)."""
  k_layer, k_angle = jax.random.split(key)
  noise = jax.random.normal(k_layer, x.shape[:2], jnp.float32)
  return snow(x, noise, jax.random.uniform(k_angle, (), jnp.float32, -135.0, -45.0), *c)


def snow(x: Array, noise: Array, angle: Array, loc, scale, zoom, threshold, radius, sigma, keep) -> Array:
  """make_cifar_c.py's `snow` of x `[H, W, 3]` given its draws (`noise [H, W]` standard normal, `angle` from
  U(-135, -45)): the snow layer `loc + scale * noise`, zoomed (`clipped_zoom`), zero below `threshold`, saved
  as 8-bit (truncated), motion-blurred (`motion_blur`; 8-bit, floor), added to the image and to itself rotated
  by 180 degrees, over the image moved towards `max(x, 1.5 gray(x) + 0.5)` (OpenCV's RGB2GRAY weights) by
  1 - `keep`. Clipped to [0, 1]."""
  m = jnp.asarray(clipped_zoom_matrix(x.shape[0], float(zoom)), jnp.float32)
  layer = m @ (loc + scale * noise) @ m.T
  layer = jnp.where(layer < threshold, 0.0, layer)
  layer = jnp.floor(jnp.clip(layer, 0, 1) * 255)[..., None]
  layer = jnp.floor(motion_blur(layer, radius, sigma, angle) + 1e-3) / 255
  gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
  x = keep * x + (1 - keep) * jnp.maximum(x, gray * 1.5 + 0.5)
  return jnp.clip(x + layer + layer[::-1, ::-1], 0, 1)


def _elastic(key, x, alpha, sigma, affine):
  """make_cifar_c.py's `elastic_transform`, its random draws from `key` (see `elastic_transform`)."""
  k_affine, k_dx, k_dy = jax.random.split(key, 3)
  field = lambda k: jax.random.uniform(k, x.shape[:2], jnp.float32, -1.0, 1.0)
  shifts = jax.random.uniform(k_affine, (3, 2), jnp.float32, -affine, affine)
  return elastic_transform(x, shifts, field(k_dx), field(k_dy), alpha, sigma)


def elastic_transform(x: Array, shifts: Array, noise_x: Array, noise_y: Array, alpha: float, sigma: float) -> Array:
  """make_cifar_c.py's `elastic_transform` of x `[H, W, C]` given its random draws: a random affine warp (the
  three points of a centered square, each moved by `shifts [3, 2]` (x, y), drawn from U(-affine, affine);
  OpenCV's bilinear `warpAffine` with reflect-101 border), then a displacement field per axis,
  `alpha * gaussian(noise, sigma)` (`noise_x`, `noise_y` `[H, W]` from U(-1, 1); skimage's gaussian with mode
  'reflect' and truncate 3), applied by `scipy.ndimage.map_coordinates(order=1, mode='reflect')`. Clipped to
  [0, 1]."""
  h, w = x.shape[:2]
  center, square = np.float32([h, w]) // 2, min(h, w) // 3
  corners = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
  inverse = affine_from_points(jnp.asarray(corners) + shifts, jnp.asarray(corners))  # output -> sampled point
  warped = bilinear_warp(x, inverse, border='reflect_101')
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
  if alpha:  # severity 1 has no displacement (alpha = sigma = 0)
    taps = gaussian_taps(sigma, truncate=3.0)
    smooth = lambda noise: alpha * _correlate_axis(_correlate_axis(noise, taps, 0, 'symmetric'), taps, 1,
                                                   'symmetric')
    rows, cols = rows + smooth(noise_y), cols + smooth(noise_x)
  return jnp.clip(bilinear_sample(warped, rows, cols, 'symmetric'), 0, 1)


def corruption_fn(dataset: str, name: str, severity: int):
  """`(key, x [H, W, C] float in [0, 1]) -> corrupted x` for one corruption and severity."""
  table.check(dataset, name, severity)
  s = severity - 1
  if dataset == table.CIFAR:
    c = CIFAR_PARAMS[name][s]
    fns = {
        'gaussian_noise': lambda k, x: jnp.clip(x + c * jax.random.normal(k, x.shape), 0, 1),
        'shot_noise': lambda k, x: jnp.clip(jax.random.poisson(k, x * c, x.shape).astype(jnp.float32) / c, 0, 1),
        'impulse_noise': lambda k, x: _salt_and_pepper(k, x, c),
        'speckle_noise': lambda k, x: jnp.clip(x + x * c * jax.random.normal(k, x.shape), 0, 1),
        'gaussian_blur': lambda k, x: jnp.clip(gaussian_blur(x, c), 0, 1),
        'glass_blur': lambda k, x: _glass_blur(k, x, c[0], c[1], c[2], coin=False),
        'defocus_blur': lambda k, x: jnp.clip(filter2d(x, disk_kernel(c[0], c[1])), 0, 1),
        'zoom_blur': lambda k, x: _zoom_blur(x, c),
        'fog': lambda k, x: _fog(k, x, c[0], c[1], FOG_MAPSIZE[dataset]),
        'contrast': lambda k, x: jnp.clip((x - x.mean((0, 1), keepdims=True)) * c + x.mean((0, 1), keepdims=True), 0, 1),
        'brightness': lambda k, x: jnp.clip(brightness_rgb(x, c), 0, 1),
        'saturate': lambda k, x: jnp.clip(saturate_rgb(x, c[0], c[1]), 0, 1),
        'pixelate': lambda k, x: _pixelate(x, c),
        'elastic_transform': lambda k, x: _elastic(k, x, *c),
        'motion_blur': lambda k, x: motion_blur(x, c[0], c[1], jax.random.uniform(k, (), jnp.float32, -45, 45)),
        'snow': lambda k, x: _snow(k, x, *c),
    }
    return fns[name]
  c = MNIST_PARAMS.get(name, [None] * 5)[s]
  fns = {
      'shot_noise': lambda k, x: jnp.clip(jax.random.poisson(k, x * c, x.shape).astype(jnp.float32) / c, 0, 1),
      'impulse_noise': lambda k, x: _salt_and_pepper(k, x, c),
      'glass_blur': lambda k, x: _glass_blur(k, x, c[0], c[1], c[2], coin=True),
      'fog': lambda k, x: _fog(k, x, c[0], c[1], FOG_MAPSIZE[dataset]),
      'spatter': lambda k, x: _spatter_mud(k, x, c[0], c[1], c[2], c[3], c[4]),
      'brightness': lambda k, x: jnp.minimum(x + c, 1.0),  # gray -> hsv -> v + c -> gray is min(x + c, 1)
      'stripe': lambda k, x: x.at[:, :7].set(1 - x[:, :7]).at[:, 21:].set(1 - x[:, 21:]),
      'dotted_line': _dotted_line,
      'zigzag': _zigzag,
      'motion_blur': lambda k, x: motion_blur(x, c[0], c[1], jax.random.uniform(k, (), jnp.float32, -45, 45)),
  }
  if name in ('shear', 'rotate', 'scale', 'translate'):
    return lambda k, x: _mnist_affine(name, k, x, c)
  return fns[name]


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
  from PIL import Image

  out = np.empty_like(images)
  for i, image in enumerate(images):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, 'JPEG', quality=quality)
    out[i] = np.asarray(Image.open(buffer))
  return out


@functools.partial(jax.jit, static_argnames=('dataset', 'name', 'severity'))
def _corrupt_chunk(images: Array, indices: Array, seed: Array, *, dataset: str, name: str, severity: int) -> Array:
  fn = corruption_fn(dataset, name, severity)
  base = jax.random.PRNGKey(seed)

  def one(image, index):
    x = image.astype(jnp.float32) / 255
    return fn(jax.random.fold_in(base, index), x)

  out = jax.vmap(one)(images, indices)
  # Truncated as the published sets were saved; the 1e-3 keeps float32 rounding (254.9999 for 255 - x) from
  # losing a level where the definition computes a whole number.
  return jnp.floor(jnp.clip(out, 0, 1) * 255 + 1e-3).astype(jnp.uint8)


def corrupt(images: np.ndarray | Array, dataset: str, name: str, severity: int, seed: int = 0,
            chunk: int = 1000) -> np.ndarray:
  """The corrupted copy of `images` uint8 `[N, H, W, C]` (the clean test set), uint8 of the same shape.

  Deterministic for (seed, image index): image i uses `fold_in(PRNGKey(seed), i)`. Runs jitted on the
  default device in chunks of `chunk` images (memory: the fog fractal of MNIST-C is 256 x 256 per image).

  Raises:
    ValueError: a corruption or severity `dataset` does not have (one line naming the flag).
  """
  table.check(dataset, name, severity)
  images = np.asarray(images, np.uint8)
  if dataset == table.CIFAR and name == 'jpeg_compression':
    return _jpeg(images, CIFAR_PARAMS[name][severity - 1])
  if dataset == table.MNIST and name in table.ONE_LEVEL:
    severity = 1  # one level: every severity is the same corruption (and the same program)
  parts = []
  for start in range(0, len(images), chunk):
    part = images[start:start + chunk]
    indices = jnp.arange(start, start + len(part), dtype=jnp.uint32)
    parts.append(np.asarray(_corrupt_chunk(part, indices, jnp.asarray(seed, jnp.uint32), dataset=dataset,
                                           name=name, severity=severity)))
  return np.concatenate(parts) if parts else images.copy()


def exactness() -> dict[str, dict[str, str]]:
  """`{dataset: {corruption: 'exact' | 'exact_host' | 'left out: why'}}` (for docs and reports)."""
  return {dataset: {**table.HOW[dataset], **{k: f'left out: {v}' for k, v in table.LEFT_OUT[dataset].items()}}
          for dataset in table.HOW}





# ----------------------------------------------------------------------------
# Reading a corrupted data set: the clean training split, the corrupted test split.


# CIFAR-10-C corruptions that TFDS's cifar10_corrupted names otherwise.
TFDS_CIFAR_NAMES = {'glass_blur': 'frosted_glass_blur', 'elastic_transform': 'elastic'}


def tfds_config(dataset: str, name: str, severity: int) -> str:
  """The TFDS builder config: `cifar10_corrupted/<name>_<severity>`, `mnist_corrupted/<name>` (MNIST-C has
  one severity per corruption, `corruption_table.MNIST_C_SEVERITY`; other severities are generated only)."""
  if dataset == table.CIFAR:
    return f'{dataset}/{TFDS_CIFAR_NAMES.get(name, name)}_{severity}'
  published = table.MNIST_C_SEVERITY.get(name)
  if published is not None and severity != published:
    raise ValueError(f'--severity={severity} is invalid with --data_source=tfds and --corruption={name}: '
                     f'TFDS mnist_corrupted has severity {published} only (other severities: --data_source=auto).')
  return f'{dataset}/{name}'


def _read_tfds_test(config_name: str, data_dir, num_classes: int):
  import tensorflow_datasets as tfds  # slow to import: only this path needs it

  from bnjax.lab.data.formats import DataError, DataNotFoundError, _checked_labels

  where = f"tfds:{config_name}@{data_dir or 'default data_dir'}"
  try:
    source = tfds.data_source(config_name, split='test', data_dir=data_dir)
    examples = [source[i] for i in range(len(source))]
  except Exception as err:  # noqa: BLE001 -- TFDS fails in many ways (network, format, imports)
    raise DataNotFoundError(f'tfds.data_source({config_name!r}, data_dir={data_dir!r}) failed: '
                            f'{type(err).__name__}: {err}') from err
  if not examples:
    raise DataError(f'{where}: the test split is empty.')
  images = np.stack([ex['image'] for ex in examples]).astype(np.uint8)
  return images, _checked_labels([ex['label'] for ex in examples], len(images), num_classes, where), where


def read_corrupted(dataset: str, corruption: str, severity: int, *, seed: int = 0, source: str = 'auto',
                   data_dir=None):
  """`Raw` of a corrupted data set: the clean train split (the source domain) and the corrupted test split.

  source: 'tfds' reads the corrupted test split from TFDS (`tfds_config`); 'auto' and 'files' generate it
  from the clean test set (local files, else TFDS for the clean set) with `corrupt(..., seed)`.
  """
  from bnjax.lab.data.formats import Raw
  from bnjax.lab.data.sources import read, spec

  table.check(dataset, corruption, severity)
  clean = table.CLEAN[dataset]
  if source == 'tfds':
    raw = read(clean, source='tfds', data_dir=data_dir)
    images, labels, where = _read_tfds_test(tfds_config(dataset, corruption, severity), data_dir,
                                            spec(clean).num_classes)
    return Raw(raw.train_images, raw.train_labels, images, labels, source=where)
  raw = read(clean, source=source, data_dir=data_dir)
  images = corrupt(raw.test_images, dataset, corruption, severity, seed)
  return raw._replace(test_images=images,
                      source=f'{raw.source} (test: {corruption} severity {severity}, generated, seed {seed})')
