"""Per-pixel weights of the flow-matching loss: the end image's face, hair and background.

The regions come from the end image's 5 landmarks (stored by the pair step, in end-crop
pixels) with the same ellipses the face-swap synthesis masks with
(`facelora.prepare.synthesis.swap_start.region_mask`): face = the `face` ellipse (cheek to
cheek, mid-forehead to the chin), hair = the `head` ellipse minus the face (hair, ears, the
crown), background = the rest; edges fall off smoothly over `feather` face sizes. A pair's
own mask image (grey levels m in [0, 1]) replaces the landmark regions: w = background +
(face - background) x m.

The map is built at the training size in pixels, averaged over each latent cell and laid out
like the family's latents by its adapter (`FamilyAdapter.latent_weights`), so each element of
the prediction gets the weight of the pixels it encodes. The loss is then
sum(w (pred - target)^2) / sum(w): the same scale as the plain mean, and equal to it when
every weight is 1.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from facelora.config import RegionWeights
from facelora.prepare.faces.align import face_frame
from facelora.prepare.synthesis.swap_start import region_mask


def landmark_weights(
    size: tuple[int, int], landmarks: np.ndarray, weights: RegionWeights
) -> np.ndarray:
    """(H, W) float32 weights for a face with 5 landmarks given in these pixels."""
    width, height = size
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    feather_px = weights.feather * face_frame(lm).size
    face = region_mask((height, width), lm, "face", feather_px)
    head = np.maximum(region_mask((height, width), lm, "head", feather_px), face)
    hair = head - face  # face + hair + background = 1 everywhere: a convex blend
    background = 1.0 - head
    w = weights.face * face + weights.hair * hair + weights.background * background
    return w.astype(np.float32)


def mask_weights(size: tuple[int, int], mask: Image.Image, weights: RegionWeights) -> np.ndarray:
    """(H, W) float32 weights from a grey mask (255: the face weight, 0: the background's)."""
    grey = mask.convert("L").resize(size, Image.Resampling.BILINEAR)
    m = np.asarray(grey, dtype=np.float32) / 255.0
    return (weights.background + (weights.face - weights.background) * m).astype(np.float32)


def tiled(size: tuple[int, int], tiles: int, tile_map) -> np.ndarray:
    """The weights of an image made of `tiles` images side by side (a diptych), each tile's
    from `tile_map((tile width, height))`, with the widths `data.side_by_side` gives them."""
    width, height = size
    step = width // tiles
    parts = [tile_map((step if i < tiles - 1 else width - step * i, height)) for i in range(tiles)]
    return np.concatenate(parts, axis=1)


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """sum(w (pred - target)^2) / sum(w) over every element; the plain mean without weights.
    `weights` broadcasts against pred (e.g. (B, C, h, w) or (B, 1, h, w))."""
    if weights is None:
        return torch.nn.functional.mse_loss(pred, target)
    weights = weights.expand_as(pred)
    return (weights * (pred - target).square()).sum() / weights.sum()
