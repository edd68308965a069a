"""Training's loss terms on decoded images: identity, LPIPS and the symmetric contrastive term.

Each step the flow-matching prediction v gives the model's one-step estimate of the clean
latents, x0_pred = x_t - sigma v (x_t = (1 - sigma) x0 + sigma noise, v = noise - x0). The
frozen VAE decodes it, with gradients flowing through the decoder to the LoRA, and the target
latents x0 (without gradients); each term compares the two images (docs/losses.md has the
formulas and their sources):

- identity: 1 - cos(f(align(D(x0))), f(align(D(x0_pred)))), f a face embedder, both images
  aligned by the TARGET's 5 landmarks (no detection on noisy predictions), only for samples
  with sigma <= max_sigma; with `window: face` only the latent window under the embedder's
  chip is decoded;
- lpips: LPIPS(D(x0_pred), D(x0)), for samples with sigma <= max_sigma;
- contrastive: for two edits a, b of one start image trained side by side with the same noise
  and sigma, InfoNCE over [cos(c(pred_a), c(tgt_a)), cos(c(pred_a), c(tgt_b))] / temperature
  (and the mirror for b), c the CLIP image encoder.

A term's value is None for a batch with no sample it applies to; the loop adds
weight x value for the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from facelora.config import Params
from facelora.errors import SettingsError
from facelora.models.adapters import FamilyAdapter
from facelora.models.perceptual import (
    BackboneUnavailable,
    find_lpips_backbone,
    load_clip,
    load_lpips,
)
from facelora.train.data import Sample

log = logging.getLogger(__name__)
FLOW_MATCHING = "flow_matching"
DECODED_TERMS = ("identity", "lpips", "contrastive")  # their log.csv columns, in this order


def predicted_x0(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean latents the velocity prediction implies at noise level sigma."""
    s = sigma.view(-1, *([1] * (noisy.dim() - 1))).to(noisy)
    return noisy - s * velocity


@dataclass(frozen=True)
class EndTile:
    """Where a sample's end image lies in its training target, and its landmarks there."""

    left: int  # pixels: the end image's tile starts here (diptych: the right tile)
    width: int
    landmarks: np.ndarray | None  # (5, 2) in training-target pixels


def end_tile(sample: Sample) -> EndTile:
    width, height = sample.size
    step = width // sample.tiles
    left = step * (sample.tiles - 1)
    tile_width = width - left
    if sample.landmarks is None:
        return EndTile(left, tile_width, None)
    end_w, end_h = sample.end_size
    points = np.asarray(sample.landmarks, np.float64).reshape(5, 2)
    points = points * np.array([tile_width / end_w, height / end_h]) + np.array([left, 0.0])
    return EndTile(left, tile_width, points)


def latent_window(
    box: tuple[float, float, float, float], cell: int, grid: tuple[int, int], margin: int = 1
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in latent cells covering the pixel box, `margin` cells wider (the
    decoder's receptive field), clipped to the (h, w) grid."""
    h, w = grid
    x0 = max(0, int(np.floor(box[0] / cell)) - margin)
    y0 = max(0, int(np.floor(box[1] / cell)) - margin)
    x1 = min(w, int(np.ceil(box[2] / cell)) + margin)
    y1 = min(h, int(np.ceil(box[3] / cell)) + margin)
    if x1 <= x0 or y1 <= y0:  # the face lies outside the image: decode it whole
        return 0, 0, w, h
    return x0, y0, x1, y1


def info_nce(pred: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, tau: float):
    """Mean over rows of -log softmax([cos(p, pos), cos(p, neg)] / tau)[0]."""
    pos = F.cosine_similarity(pred, positive, dim=-1)
    neg = F.cosine_similarity(pred, negative, dim=-1)
    logits = torch.stack([pos, neg], dim=-1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=pred.device))


class ClipImageFeatures(torch.nn.Module):
    """CLIP's image embedding of (B, 3, H, W) pixels in [-1, 1], differentiable in them: the
    processor's resize to its square input and its mean/std, done in torch."""

    def __init__(self, model, processor):
        super().__init__()
        self.model = model
        image = processor.image_processor
        crop = getattr(image, "crop_size", None) or image.size
        side = crop.get("height") if hasattr(crop, "get") else getattr(crop, "height", crop)
        self.side = int(side)
        self.register_buffer("mean", torch.tensor(image.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image.image_std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        out = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        if not isinstance(out, torch.Tensor):  # transformers 5 may return an output object
            out = out.pooler_output
        return out.float()


class DecodedTerms:
    """The loss terms switched on in train.losses that need decoded images, their networks
    loaded once (frozen, on the training device)."""

    def __init__(self, params: Params, adapter: FamilyAdapter, device: torch.device):
        self.losses = params.train.losses
        self.adapter, self.device = adapter, device
        self.names = [n for n in DECODED_TERMS if n in self.losses.decoded_terms]
        self.identity = self.lpips = self.clip = None
        if "identity" in self.names:
            self.identity = _load_identity(params, device)
        if "lpips" in self.names:
            self.lpips = _load_lpips(params, device)
        if "contrastive" in self.names:
            self.clip = _load_clip(params, device)

    def weight(self, name: str) -> float:
        return getattr(self.losses, name).weight

    def __call__(
        self,
        batch: list[Sample],
        x0: torch.Tensor,
        noisy: torch.Tensor,
        velocity: torch.Tensor,
        sigma: torch.Tensor,
        paired: bool,
    ) -> dict[str, torch.Tensor | None]:
        """Each term's unweighted value on this batch (None: it applies to no sample)."""
        x0 = x0.to(self.device)
        pred_x0 = predicted_x0(noisy, velocity.float(), sigma.to(self.device))
        sig = [float(s) for s in sigma]
        tiles = [end_tile(s) for s in batch]
        full_pred: dict[int, torch.Tensor] = {}
        full_target: dict[int, torch.Tensor] = {}

        def full(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if i not in full_pred:
                full_pred[i] = self.adapter.decode_latents(pred_x0[i : i + 1])
                with torch.no_grad():
                    full_target[i] = self.adapter.decode_latents(x0[i : i + 1])
            return full_pred[i], full_target[i]

        values: dict[str, torch.Tensor | None] = {}
        losses = self.losses
        if self.lpips is not None:
            rows = [i for i in range(len(batch)) if sig[i] <= losses.lpips.max_sigma]
            values["lpips"] = (
                torch.stack([self._lpips(*full(i), tiles[i]) for i in rows]).mean()
                if rows
                else None
            )
        if self.clip is not None:
            values["contrastive"] = self._contrastive(batch, sig, tiles, full) if paired else None
        if self.identity is not None:
            rows = [
                i
                for i in range(len(batch))
                if sig[i] <= losses.identity.max_sigma and tiles[i].landmarks is not None
            ]
            values["identity"] = (
                torch.stack(
                    [self._identity(i, pred_x0, x0, tiles[i], full, full_pred) for i in rows]
                ).mean()
                if rows
                else None
            )
        return {n: values[n] for n in self.names}

    # -- the terms ---------------------------------------------------------------------------

    def _lpips(self, pred: torch.Tensor, target: torch.Tensor, tile: EndTile) -> torch.Tensor:
        cut = slice(tile.left, tile.left + tile.width)  # the end image only (diptych)
        return self.lpips(pred[..., cut], target[..., cut]).reshape(())

    def _contrastive(self, batch, sig, tiles, full) -> torch.Tensor | None:
        temperature = self.losses.contrastive.temperature
        rows = [
            k
            for k in range(0, len(batch) - 1, 2)
            if max(sig[k], sig[k + 1]) <= self.losses.contrastive.max_sigma
        ]
        if not rows:
            return None
        preds, targets = [], []
        for k in rows:
            for i in (k, k + 1):
                pred, target = full(i)
                cut = slice(tiles[i].left, tiles[i].left + tiles[i].width)
                preds.append(pred[..., cut])
                targets.append(target[..., cut])
        fp = self.clip(torch.cat(preds))
        with torch.no_grad():
            ft = self.clip(torch.cat(targets))
        a, b = slice(0, None, 2), slice(1, None, 2)
        return 0.5 * (
            info_nce(fp[a], ft[a], ft[b], temperature) + info_nce(fp[b], ft[b], ft[a], temperature)
        )

    def _identity(self, i, pred_x0, x0, tile: EndTile, full, full_pred) -> torch.Tensor:
        landmarks = tile.landmarks
        if self.losses.identity.window == "face" and i not in full_pred:
            cell = self.adapter.latent_cell
            box = self.identity.footprint(landmarks)
            x_0, y_0, x_1, y_1 = latent_window(box, cell, tuple(pred_x0.shape[2:]))
            pred = self.adapter.decode_latents(pred_x0[i : i + 1, :, y_0:y_1, x_0:x_1])
            with torch.no_grad():
                target = self.adapter.decode_latents(x0[i : i + 1, :, y_0:y_1, x_0:x_1])
            landmarks = landmarks - np.array([x_0 * cell, y_0 * cell])
        else:
            pred, target = full(i)
        points = torch.as_tensor(landmarks, dtype=torch.float32, device=self.device)[None]
        with torch.no_grad():
            reference = self.identity(target, points)
        return 1.0 - F.cosine_similarity(self.identity(pred, points), reference, dim=-1)[0]


# -- loading the networks --------------------------------------------------------------------


def _load_identity(params: Params, device: torch.device):
    from facelora.train.identity import load_identity_embedder

    setting = params.train.losses.identity
    return load_identity_embedder(setting.backend, setting.arcface_model, device)


def _load_lpips(params: Params, device: torch.device):
    setting = params.train.losses.lpips
    try:
        found = find_lpips_backbone(
            setting.net, setting.backbone, "train.losses.lpips.backbone", "train.losses.lpips.net"
        )
        model = load_lpips(setting.net, found.path)
    except BackboneUnavailable as exc:
        raise SettingsError(
            f"train.losses.lpips.weight is {setting.weight}, but {exc}; "
            "or set train.losses.lpips.weight: 0"
        ) from None
    if not found.official:
        log.warning("LPIPS loss: %s is not torchvision's own checkpoint", found.path)
    return model.to(device)


def _load_clip(params: Params, device: torch.device) -> ClipImageFeatures:
    setting = params.train.losses.contrastive
    try:
        model, processor = load_clip(setting.clip_model, "train.losses.contrastive.clip_model")
    except BackboneUnavailable as exc:
        raise SettingsError(
            f"train.losses.contrastive.weight is {setting.weight}: the contrastive loss compares "
            f"CLIP image features, but {exc} (or set the weight to 0)"
        ) from None
    return ClipImageFeatures(model, processor).to(device)
