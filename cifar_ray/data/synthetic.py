"""A small, seeded, learnable 10-class 32x32 RGB set for smoke tests (`synthetic[:N]`).

Each class is a patch of stripes: 5 tilts from the horizontal (0, 22.5, 45, 67.5, 90
degrees, leaning left or right at random) x 2 stripe periods (coarse 8 px, fine 4 px). A
mirror image tilts the other way, so flips keep every image in its class: the default
augmentation (random horizontal flip) helps here as on photographs. (Version 1 used
orientations 0-144 degrees, which a flip swaps between classes: with flips on no net could
pass 0.6.) Everything else is nuisance, drawn at random per image: stripe phase, patch
position (+-6 px), patch size, background and stripe colours, a little orientation/period
jitter and pixel noise. So no single pixel or colour says the class (a
classifier on raw pixel means is near chance), while a tiny CNN, whose 3x3 filters see
orientation and frequency directly, learns it in an epoch or two.

The output is a pure function of (n_train, n_test, seed): same bytes every time. Train and
test come from separate random streams, so `synthetic:N` changes the train split only.
"""

from __future__ import annotations

import numpy as np

VERSION = 2  # bump when the images change: it is part of the cache key
ANGLES = (0, 22.5, 45, 67.5, 90)  # stripe tilt of class c % 5 (either way), degrees
PERIODS = {"coarse": 8.0, "fine": 4.0}  # stripe period of class c // 5, pixels
CLASSES = [f"{kind}-{angle}deg" for kind in PERIODS for angle in ANGLES]


def generate(n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict:
    """{"train": (x, y), "test": (x, y)}: uint8 (N, 32, 32, 3) images, int64 (N,) labels."""
    return {
        "train": _images(n_train, np.random.default_rng([seed, 0])),
        "test": _images(n_test, np.random.default_rng([seed, 1])),
    }


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Balanced classes (counts differ by at most one), in random order.
    y = rng.permutation(np.arange(n) % len(CLASSES))
    tilt = np.take(ANGLES, y % 5) * rng.choice([-1.0, 1.0], n)
    angle = np.deg2rad(tilt + rng.normal(0, 3, n))
    period = np.take(list(PERIODS.values()), y // 5) * rng.uniform(0.9, 1.1, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    cx, cy = 15.5 + rng.uniform(-6, 6, (2, n))
    radius = rng.uniform(7, 11, n)
    background = rng.uniform(0, 1, (n, 3))
    # Stripe colour: each channel 0.35-0.65 away from the background (mod 1), so contrast
    # never vanishes but its sign and hue say nothing about the class.
    stripe = (background + rng.uniform(0.35, 0.65, (n, 3))) % 1.0

    def per_image(v):
        return v[:, None, None]

    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    dx, dy = xx - per_image(cx), yy - per_image(cy)
    along = dx * per_image(np.cos(angle)) + dy * per_image(np.sin(angle))
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * along / per_image(period) + per_image(phase))
    envelope = np.exp(-(dx**2 + dy**2) / (2 * per_image(radius) ** 2))
    alpha = (wave * envelope)[..., None]  # (n, 32, 32, 1): how much stripe colour shows
    img = background[:, None, None] * (1 - alpha) + stripe[:, None, None] * alpha
    img += rng.normal(0, 0.06, img.shape)
    x = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)
