"""Synthetic faces: crude cartoon faces drawn from a seed, for tests and for runs at any scale.

Each identity has its own face geometry (oval size, aspect and jaw, ears, eye spacing and size,
brow thickness, tilt and curve, nose length and width, mouth width and lips, hair line, parting,
volume and length) and tone (skin, hair and iris colour), and may wear glasses, a moustache, a
beard, a mole, coloured cheeks or be bald. Each photo of an identity varies pose (shift, small
rotation and scale), lighting (a gradient of random direction and strength, overall gain),
expression (smile, open mouth, eye openness), background and pixel noise. Background and lighting
vary per photo so that the mean colour of an image says little about who it shows.

The ranges are tuned so that the paper's recognizer, trained on 5 photos of each of 40 identities
at 64x64 grey, reaches about 97% test accuracy, while the nearest class mean of pixels reaches
about 80% and of mean colour about 10%.

Everything is drawn with ``jax.random.fold_in``: identity ``i`` of seed ``s`` has the same
features whatever ``num_identities`` is, and photo ``j`` of it the same pose.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

# Images rendered per compiled call; the last chunk is padded so there is one compile per shape.
_CHUNK = 256

# Hair colours (RGB): black, dark brown, brown, auburn, blond, white; far apart in grey too.
_HAIR = np.array(
    [
        [0.08, 0.07, 0.06],
        [0.25, 0.16, 0.10],
        [0.45, 0.30, 0.18],
        [0.78, 0.40, 0.18],
        [0.85, 0.72, 0.45],
        [0.88, 0.88, 0.86],
    ],
    np.float32,
)
# Iris colours: brown, blue, green, dark.
_IRIS = np.array(
    [[0.40, 0.25, 0.12], [0.25, 0.45, 0.70], [0.30, 0.50, 0.30], [0.12, 0.10, 0.08]],
    np.float32,
)
_SKIN_LIGHT = np.array([0.96, 0.82, 0.72], np.float32)
_SKIN_DARK = np.array([0.42, 0.28, 0.20], np.float32)


def identity_params(key: jax.Array) -> dict[str, jax.Array]:
    """One identity's geometry and tone, drawn from ``key``. Lengths in half image heights."""

    def u(i, lo, hi, shape=()):
        return jax.random.uniform(jax.random.fold_in(key, i), shape, minval=lo, maxval=hi)

    def pick(i, table):
        return jnp.asarray(table)[jax.random.randint(jax.random.fold_in(key, i), (), 0, len(table))]

    def coin(i, p):
        return jax.random.bernoulli(jax.random.fold_in(key, i), p).astype(jnp.float32)

    skin = _SKIN_LIGHT + u(0, 0.0, 1.0) * (_SKIN_DARK - _SKIN_LIGHT)
    return {
        "skin": jnp.clip(skin + u(1, -0.04, 0.04, (3,)), 0, 1),
        "hair": jnp.clip(pick(2, _HAIR) + u(3, -0.05, 0.05, (3,)), 0, 1),
        "iris": pick(4, _IRIS),
        "face_rx": u(5, 0.44, 0.68),
        "face_ry": u(6, 0.62, 0.84),
        "face_cy": u(7, 0.02, 0.14),
        "jaw": u(8, 0.0, 0.3),  # narrows the oval towards the chin
        "hairline": u(9, -0.85, -0.50),  # relative to the face centre, up is negative
        "hair_tilt": u(10, -0.25, 0.25),  # a side parting
        "hair_volume": u(11, 1.0, 1.35),
        "hair_length": u(12, -0.2, 0.9),  # how far below the face centre the hair reaches
        "eye_y": u(13, -0.22, -0.06),
        "eye_dx": u(14, 0.16, 0.30),
        "eye_rx": u(15, 0.07, 0.13),
        "eye_ry": u(16, 0.035, 0.07),
        "brow_gap": u(17, 0.05, 0.14),
        "brow_thick": u(18, 0.02, 0.06),
        "brow_tilt": u(19, -0.35, 0.35),
        "brow_curve": u(20, -1.5, 2.5),
        "nose_len": u(21, 0.14, 0.32),
        "nose_w": u(22, 0.04, 0.10),
        "mouth_gap": u(23, 0.07, 0.16),  # below the nose tip
        "mouth_w": u(24, 0.10, 0.24),
        "lip_t": u(25, 0.02, 0.05),
        "ear": u(26, 0.08, 0.16),
        "glasses": coin(27, 0.25),
        "moustache": coin(28, 0.25),
        "beard": coin(29, 0.15),
        "mole": coin(30, 0.4),
        "mole_x": u(31, -0.35, 0.35),
        "mole_y": u(32, -0.1, 0.35),
        "cheeks": coin(33, 0.4) * u(34, -0.25, 0.25),  # darker or lighter cheeks, or none
        "bald": coin(35, 0.15),  # no fringe and no hair on top
    }


def photo_params(key: jax.Array) -> dict[str, jax.Array]:
    """One photo's pose, lighting, expression, background and noise key."""
    k = jax.random.split(key, 14)

    def u(i, lo, hi):
        return jax.random.uniform(k[i], (), minval=lo, maxval=hi)

    return {
        "dx": jnp.clip(0.04 * jax.random.normal(k[0]), -0.1, 0.1),
        "dy": jnp.clip(0.04 * jax.random.normal(k[1]), -0.1, 0.1),
        "rot": jnp.clip(0.03 * jax.random.normal(k[2]), -0.1, 0.1),
        "scale": jnp.exp(jnp.clip(0.03 * jax.random.normal(k[3]), -0.08, 0.08)),
        "light_dir": u(4, 0.0, 2 * np.pi),
        "light": u(5, 0.0, 0.15),
        "gain": u(6, 0.94, 1.06),
        "smile": u(7, -0.4, 0.8),
        "open": jnp.maximum(u(8, -1.0, 1.0), 0.0),
        "eye_open": jnp.clip(u(9, 0.5, 1.4), 0.5, 1.0),
        "bg": u(10, 0.2, 0.32),
        "bg_tint": jax.random.uniform(k[11], (3,), minval=-0.03, maxval=0.03),
        "bg_grad": u(12, -0.1, 0.1),
        "noise": jax.random.bits(k[13], (), jnp.uint32),
    }


def _soft(d: jax.Array, soft: float) -> jax.Array:
    """A soft step: 1 where the signed distance d > soft, 0 where d < -soft, linear between.

    A linear ramp (not a sigmoid) because it is cheap and antialiases just as well.
    """
    return jnp.clip(0.5 + d / (2 * soft), 0.0, 1.0)


def _ellipse(u, v, cx, cy, rx, ry, soft):
    """Soft mask of an ellipse (1 inside).

    (1 - r^2) / 2 is the distance 1 - r to first order at the rim, where only it matters, and needs
    no square root.
    """
    r2 = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
    return _soft(0.5 * (1 - r2) * jnp.minimum(rx, ry), soft)


def _noise(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Cheap pixel noise with mean 0 and variance 1 from a uint32 seed.

    A murmur3 hash of the pixel index, far cheaper on CPU than ``jax.random.normal`` (which
    took a third of the rendering time); the sum of two uniforms is close enough to Gaussian.
    """
    x = jnp.arange(np.prod(shape), dtype=jnp.uint32).reshape(shape) * jnp.uint32(0x9E3779B1) + seed
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    lo = (x & 0xFFFF).astype(jnp.float32)
    hi = (x >> 16).astype(jnp.float32)
    return (lo + hi - 65535.0) / 65536.0 * np.sqrt(6.0)


def render(ident: dict, photo: dict, image_size: tuple[int, int]) -> jax.Array:
    """Draws one face. Returns RGB in [0, 1]. # [h, w, 3]"""
    h, w = image_size
    soft = 1.0 / h  # half a pixel in half-image-height units
    y = jnp.linspace(-1 + 1 / h, 1 - 1 / h, h)[:, None]  # [h, 1]
    x = (jnp.linspace(-1 + 1 / w, 1 - 1 / w, w) * (w / h))[None, :]  # [1, w]
    # Face coordinates: undo the photo's shift, rotation and scale.
    c, s = jnp.cos(photo["rot"]), jnp.sin(photo["rot"])
    px, py = x - photo["dx"], y - photo["dy"]
    u = (c * px + s * py) / photo["scale"]  # [h, w]
    v = (-s * px + c * py) / photo["scale"]
    p = ident

    def paint(img, mask, colour):
        return img + mask[..., None] * (colour - img)

    bg = photo["bg"] * (1 + photo["bg_grad"] * y)[..., None] + photo["bg_tint"]  # [h, 1, 3]
    img = jnp.broadcast_to(jnp.clip(bg, 0, 1), (h, w, 3))

    cy = p["face_cy"]
    # Hair behind the head, down to hair_length below the face centre.
    back = _ellipse(
        u, v, 0.0, cy - 0.06, p["face_rx"] * p["hair_volume"], p["face_ry"] * p["hair_volume"], soft
    )
    back = back * _soft(cy + p["hair_length"] - v, soft)
    back = back * (1 - p["bald"] * _soft(cy - p["face_ry"] * 0.5 - v, soft))
    img = paint(img, back, p["hair"])
    # Neck, then the face oval, narrowed towards the chin by the jaw.
    neck = _soft(p["face_rx"] * 0.45 - jnp.abs(u), soft) * _soft(v - cy, soft)
    img = paint(img, neck, p["skin"] * 0.8)
    for side in (-1.0, 1.0):
        ear = _ellipse(u, v, side * p["face_rx"] * 0.97, cy - 0.05, p["ear"] * 0.6, p["ear"], soft)
        img = paint(img, ear, p["skin"] * 0.9)
    rx = p["face_rx"] * (1 - p["jaw"] * jnp.clip((v - cy) / p["face_ry"], 0, 1))
    face = _soft(
        (1 - jnp.sqrt((u / rx) ** 2 + ((v - cy) / p["face_ry"]) ** 2)) * p["face_rx"], soft
    )
    img = paint(img, face, p["skin"])
    # A beard: the face below the mouth corners in a darkened hair colour.
    img = paint(
        img, 0.8 * p["beard"] * face * _soft(v - (cy + p["face_ry"] * 0.35), soft), p["hair"] * 0.8
    )
    for side in (-1.0, 1.0):
        cheek = _ellipse(u, v, side * p["face_rx"] * 0.55, cy + 0.12, 0.12, 0.09, 4 * soft)
        img = img * (1 + p["cheeks"] * cheek[..., None])
    mole = _ellipse(u, v, p["mole_x"] * p["face_rx"], cy + p["mole_y"], 0.025, 0.025, soft)
    img = paint(img, p["mole"] * mole, p["skin"] * 0.35)
    # Fringe: hair over the forehead above a tilted, curved hair line.
    line = cy + p["hairline"] + p["hair_tilt"] * u + 0.6 * u**2
    img = paint(img, (1 - p["bald"]) * face * _soft(line - v, soft), p["hair"])

    ey = cy + p["eye_y"]
    for side in (-1.0, 1.0):
        ex = side * p["eye_dx"]
        # Brow: a tilted parabola above the eye (tilt mirrored so both slope the same way).
        bu = (u - ex) / p["eye_rx"]
        bv = (
            ey
            - p["eye_ry"]
            - p["brow_gap"]
            + side * p["brow_tilt"] * (u - ex)
            - (p["brow_curve"] * 0.02 * (1 - bu**2))
        )
        brow = _soft(p["brow_thick"] / 2 - jnp.abs(v - bv), soft) * _soft(1.3 - jnp.abs(bu), 0.1)
        img = paint(img, brow, p["hair"] * 0.6)
        # Eye: white, iris, pupil; the lids close with eye_open.
        ry = p["eye_ry"] * photo["eye_open"]
        white = _ellipse(u, v, ex, ey, p["eye_rx"], ry, soft)
        img = paint(img, white, jnp.array([0.92, 0.92, 0.90]))
        iris = white * _ellipse(u, v, ex, ey, p["eye_ry"] * 0.95, p["eye_ry"] * 0.95, soft)
        img = paint(img, iris, p["iris"])
        pupil = white * _ellipse(u, v, ex, ey, p["eye_ry"] * 0.4, p["eye_ry"] * 0.4, soft)
        img = paint(img, pupil, jnp.array([0.03, 0.03, 0.03]))
        # Glasses: a ring around the eye.
        r = jnp.sqrt(((u - ex) / (p["eye_rx"] * 1.5)) ** 2 + ((v - ey) / (p["eye_rx"] * 1.2)) ** 2)
        ring = _soft(0.1 - jnp.abs(r - 1), 0.5 * soft / p["eye_rx"]) * p["glasses"]
        img = paint(img, ring, jnp.array([0.1, 0.1, 0.12]))

    # Nose: a shaded ridge from the eyes down, and two nostrils at its tip.
    tip = ey + p["nose_len"]
    ridge = _soft(p["nose_w"] * 0.3 - jnp.abs(u), soft) * _soft(v - ey, soft) * _soft(tip - v, soft)
    img = paint(img, 0.5 * ridge, p["skin"] * 0.7)
    for side in (-1.0, 1.0):
        nostril = _ellipse(
            u, v, side * p["nose_w"] * 0.5, tip, p["nose_w"] * 0.35, p["nose_w"] * 0.2, soft
        )
        img = paint(img, nostril, p["skin"] * 0.45)

    # Mouth: lips along a curve that bends with the smile; dark inside when open.
    mw = p["mouth_w"]
    above = tip + p["mouth_gap"] * 0.45
    moustache = _soft(p["mouth_gap"] * 0.3 - jnp.abs(v - above), soft) * _soft(
        mw - jnp.abs(u), soft
    )
    img = paint(img, p["moustache"] * moustache, p["hair"] * 0.7)
    mu = jnp.clip(1 - (u / mw) ** 2, 0, 1)
    centre = tip + p["mouth_gap"] + photo["smile"] * 0.05 * mu
    half = p["lip_t"] + photo["open"] * 0.035 * mu
    lips = _soft(half - jnp.abs(v - centre), soft) * _soft(mw - jnp.abs(u), soft)
    img = paint(img, lips, p["skin"] * jnp.array([0.75, 0.45, 0.45]))
    inside = lips * _soft(photo["open"] * 0.03 * mu - jnp.abs(v - centre), soft)
    img = paint(img, inside, jnp.array([0.15, 0.05, 0.05]))

    light = photo["gain"] * (
        1 + photo["light"] * (jnp.cos(photo["light_dir"]) * x + jnp.sin(photo["light_dir"]) * y)
    )
    img = img * light[..., None]
    img = img + 0.02 * _noise(photo["noise"], img.shape)
    return jnp.clip(img, 0, 1)


@functools.partial(jax.jit, static_argnames=("image_size", "channels"))
def _render_chunk(key, ids, photos, image_size, channels):
    """Renders photo ``photos[b]`` of identity ``ids[b]``. # [b] -> [b, h, w, channels]"""

    def one(i, j):
        ikey = jax.random.fold_in(key, i)
        img = render(identity_params(ikey), photo_params(jax.random.fold_in(ikey, j)), image_size)
        if channels == 1:
            img = img @ jnp.array([0.299, 0.587, 0.114])[:, None]  # luma
        return img

    return jax.vmap(one)(ids, photos)


def names(num_identities: int) -> tuple[str, ...]:
    """The identity names in label order: "synthetic_0000", ... (at least four digits)."""
    digits = max(4, len(str(max(num_identities - 1, 0))))
    return tuple(f"synthetic_{i:0{digits}d}" for i in range(num_identities))


def face_chunks(
    num_identities: int,
    images_per_identity: int,
    image_size: tuple[int, int],
    channels: int,
    seed: int,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """The faces of ``make_faces`` a chunk at a time, so that memory stays one chunk.

    Yields:
      (index of the chunk's first image, float32 images in [0, 1]). # [chunk, h, w, channels]
    """
    h, w = (int(s) for s in image_size)
    n = num_identities * images_per_identity
    ids = np.repeat(np.arange(num_identities, dtype=np.int32), images_per_identity)
    photos = np.tile(np.arange(images_per_identity, dtype=np.int32), num_identities)
    key = jax.random.key(seed)
    chunk = min(_CHUNK, max(n, 1))
    starts = range(0, n, chunk)
    for start in tqdm.tqdm(starts, desc="synthetic faces", unit="chunk", disable=not progress):
        stop = min(start + chunk, n)
        pad = chunk - (stop - start)
        part = _render_chunk(
            key,
            np.pad(ids[start:stop], (0, pad)),
            np.pad(photos[start:stop], (0, pad)),
            (h, w),
            channels,
        )
        yield start, np.asarray(part)[: stop - start]


def make_faces(
    num_identities: int,
    images_per_identity: int,
    image_size: tuple[int, int],
    channels: int,
    seed: int,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Synthetic faces, deterministic from ``seed``.

    Args:
      num_identities: how many people.
      images_per_identity: photos of each.
      image_size: (height, width).
      channels: 1 (grey) or 3 (RGB).
      seed: the random seed.
      progress: show a progress bar.

    Returns:
      images: float32 in [0, 1], identity-major. # [n, h, w, channels]
      labels: int32 identity of each image. # [n]
      names: "synthetic_0000", ... in label order.
    """
    h, w = (int(s) for s in image_size)
    n = num_identities * images_per_identity
    ids = np.repeat(np.arange(num_identities, dtype=np.int32), images_per_identity)
    out = np.empty((n, h, w, channels), np.float32)
    chunks = face_chunks(num_identities, images_per_identity, (h, w), channels, seed, progress)
    for start, part in chunks:
        out[start : start + len(part)] = part
    return out, ids, names(num_identities)
