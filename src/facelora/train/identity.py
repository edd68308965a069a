"""Frozen, differentiable face-identity embedders for the identity loss.

The identity loss compares f(align(D(x0))) with f(align(D(x̂0))): both decoded images are
aligned with the TARGET image's 5 landmarks (facelora's canonical points, LANDMARK_NAMES) and
embedded by a frozen face recogniser. Everything here is plain torch (affine_grid-free
grid_sample and convolutions), so gradients reach the pixels; no weight ever trains.

- Alignment: `similarity_matrix` is the least-squares similarity (rotation, uniform scale,
  translation: Umeyama's estimate, as skimage's SimilarityTransform.estimate that insightface's
  `estimate_norm` calls) from the 5 landmarks to a template; `warp` resamples with it exactly as
  `cv2.warpAffine(img, M, (side, side), flags=INTER_LINEAR)` does (pixel centres at integer
  coordinates, black outside the image).
- dlib (the default; its weights ship in face-recognition-models): dlib's chip is fitted on 68
  points, so the 5-point template DLIB_TEMPLATE was derived from dlib itself (see there); the
  network is facelora's PyTorch port of dlib's ResNet (prepare.faces.dlib_resnet). Like dlib's
  `extract_image_chip`, a face much larger than the 150 px chip is first halved (a pyramid)
  so that the bilinear sampling does not alias.
- ArcFace: an insightface recognition ONNX (w600k_r50.onnx from buffalo_l, glintr100.onnx, ...)
  converted to torch with onnx2torch, on insightface's 112 px template (`arcface_dst`) and its
  input normalisation (RGB, (x - 127.5) / 127.5), no pyramid (insightface's `norm_crop` has
  none).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facelora.errors import SettingsError

ARCFACE_SETTING = "train.losses.identity.arcface_model"
BACKEND_SETTING = "train.losses.identity.backend"
BACKENDS = ("dlib", "arcface")

DLIB_CHIP_SIDE, DLIB_CHIP_PADDING = 150, 0.25
# Where facelora's 5 canonical points (eye on the image's left, other eye, nose tip, mouth
# corner left, mouth corner right; dlib_backend.five_from_68) land in dlib's 150 px chip
# (dlib.get_face_chip(img, shape68, 150, 0.25)). Derived from dlib: every face that dlib's HOG
# detector (upsample 1) finds in ../shared/faces (39 faces), its 68-point shape reduced to the
# 5 points and mapped through `dlib_chip_matrix(dlib.get_face_chip_details(shape, 150, 0.25))`,
# averaged. tests/test_train_identity.py re-derives it. (The 5 points of dlib's own mean face
# shape, which get_face_chip_details fits to, are within 2 px of these.)
DLIB_TEMPLATE = np.array(
    [
        [47.4841, 46.0764],
        [99.7665, 46.5252],
        [72.7999, 76.3946],
        [48.6593, 102.3951],
        [99.4428, 102.1616],
    ],
    np.float64,
)
ARCFACE_SIDE = 112


def arcface_template() -> np.ndarray:
    """insightface's 112 px ArcFace template (face_align.arcface_dst), 5 x 2."""
    from insightface.utils.face_align import arcface_dst

    return np.asarray(arcface_dst, np.float64)


# --- alignment -------------------------------------------------------------------------------


def similarity_matrix(landmarks: torch.Tensor, template) -> torch.Tensor:
    """(B, N, 2) points and an (N, 2) template -> (B, 2, 3) similarity matrices M mapping each
    image's points onto the template in the least-squares sense (M @ [x, y, 1] ≈ template), as
    skimage's SimilarityTransform.estimate (Umeyama, no reflection). Computed in float64."""
    src = landmarks.to(torch.float64)
    dst = torch.as_tensor(np.asarray(template), dtype=torch.float64, device=src.device)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=0)
    xs, xd = src - src_mean, dst - dst_mean
    norm = (xs**2).sum(dim=(1, 2))
    a = (xs[..., 0] * xd[..., 0] + xs[..., 1] * xd[..., 1]).sum(dim=1) / norm
    b = (xs[..., 0] * xd[..., 1] - xs[..., 1] * xd[..., 0]).sum(dim=1) / norm
    rotation = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    translation = dst_mean - (rotation @ src_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([rotation, translation.unsqueeze(-1)], dim=-1)


def _invert(matrix: torch.Tensor) -> torch.Tensor:
    full = torch.cat(
        [
            matrix,
            torch.tensor([0.0, 0.0, 1.0], dtype=matrix.dtype, device=matrix.device).expand(
                matrix.shape[0], 1, 3
            ),
        ],
        dim=1,
    )
    return torch.linalg.inv(full)[:, :2]


def warp(pixels: torch.Tensor, matrix: torch.Tensor, out_side: int) -> torch.Tensor:
    """(B, C, H, W) images and (B, 2, 3) forward matrices (image -> crop coordinates, as
    cv2.warpAffine takes them) -> (B, C, out_side, out_side) bilinear crops, zero outside the
    image: cv2.warpAffine(img, M, (out_side, out_side), flags=INTER_LINEAR) up to cv2's
    fixed-point rounding. Differentiable with respect to pixels."""
    _, _, height, width = pixels.shape
    inverse = _invert(matrix.to(torch.float64))  # crop -> image
    axis = torch.arange(out_side, dtype=torch.float64, device=pixels.device)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    crop = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (out, out, 3), pixel centres
    src = torch.einsum("bij,hwj->bhwi", inverse.to(pixels.device), crop)
    # grid_sample with align_corners=False: -1 and 1 are the outer edges of the border
    # pixels, so pixel centre x (cv2's convention) sits at (2x + 1) / W - 1
    size = torch.tensor([width, height], dtype=torch.float64, device=pixels.device)
    grid = (2 * src + 1) / size - 1
    return F.grid_sample(
        pixels, grid.to(pixels.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )


def _halve(pixels: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 box-filtered half-size image and the matrix that maps it to the same crop."""
    half = F.avg_pool2d(pixels, 2)
    # pixel x' of the half image covers x = 2x' and 2x' + 1: its centre is x = 2x' + 0.5
    scale = torch.tensor(
        [[2.0, 0.0, 0.5], [0.0, 2.0, 0.5], [0.0, 0.0, 1.0]],
        dtype=matrix.dtype,
        device=matrix.device,
    )
    return half, matrix @ scale


def pyramid_levels(matrix: torch.Tensor, out_side: int) -> list[int]:
    """How many halvings dlib's extract_image_chip applies before sampling each crop: while
    the halved source region is still larger than the chip."""
    det = torch.linalg.det(matrix[:, :, :2].to(torch.float64)).abs()
    source_side = out_side / det.sqrt()  # the crop's extent in image pixels
    return [
        max(0, math.ceil(math.log2(float(s) / out_side) - 1e-9) - 1) if s > out_side else 0
        for s in source_side
    ]


def align(
    pixels: torch.Tensor, landmarks: torch.Tensor, template, out_side: int, pyramid: bool = False
) -> torch.Tensor:
    """Crops (B, C, out_side, out_side) with each image's landmarks moved onto the template."""
    matrix = similarity_matrix(landmarks, template)
    if not pyramid:
        return warp(pixels, matrix, out_side)
    crops = []
    for i, levels in enumerate(pyramid_levels(matrix, out_side)):
        image, m = pixels[i : i + 1], matrix[i : i + 1]
        for _ in range(levels):
            image, m = _halve(image, m)
        crops.append(warp(image, m, out_side))
    return torch.cat(crops)


def dlib_chip_matrix(details) -> np.ndarray:
    """The 2 x 3 image -> chip matrix of a dlib.chip_details (dlib's get_mapping_to_chip: the
    rect's corners, rotated by angle about its centre, go to the chip's corner pixels)."""
    r = details.rect
    centre = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
    c, s = math.cos(details.angle), math.sin(details.angle)
    rotation = np.array([[c, -s], [s, c]])
    corners = np.array([(r.left(), r.top()), (r.right(), r.top()), (r.left(), r.bottom())])
    src = (corners - centre) @ rotation.T + centre
    dst = np.array([[0, 0], [details.cols - 1, 0], [0, details.rows - 1]], np.float64)
    return np.linalg.solve(np.c_[src, np.ones(3)], dst).T


# --- the embedders ---------------------------------------------------------------------------


class IdentityEmbedder(torch.nn.Module):
    """(B, 3, H, W) pixels in [-1, 1] (RGB, as a VAE decodes) and (B, 5, 2) landmarks in those
    pixels' coordinates -> (B, D) unit-norm identity embeddings, differentiable with respect
    to the pixels. Frozen: no parameter requires grad, and it stays in eval mode (train() is a
    no-op), so nothing (BatchNorm statistics included) ever changes."""

    name: str
    template: np.ndarray
    side: int
    pyramid: bool = False

    def __init__(self):
        super().__init__()

    def freeze(self) -> IdentityEmbedder:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> IdentityEmbedder:
        return super().train(False)

    def footprint(self, landmarks: np.ndarray) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the image pixels the aligned crop of a face with these (5, 2)
        landmarks is sampled from (the crop's corners mapped back), for decoding only them."""
        points = torch.as_tensor(np.asarray(landmarks, np.float64).reshape(1, 5, 2))
        back = _invert(similarity_matrix(points, self.template))[0].numpy()
        s = float(self.side)
        corners = np.array([[0, 0, 1], [s, 0, 1], [0, s, 1], [s, s, 1]]) @ back.T
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    def crops(self, pixels: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Aligned crops in 0..255 RGB (black outside the image, as cv2 and dlib pad)."""
        rgb = (pixels.float() + 1.0) * 127.5
        return align(rgb, landmarks, self.template, self.side, self.pyramid)

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Aligned 0..255 RGB crops -> raw (unnormalised) features."""
        raise NotImplementedError

    def features(self, pixels: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The network's raw output (not normalised)."""
        return self.embed_crops(self.crops(pixels, landmarks))

    def forward(self, pixels: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(pixels, landmarks), dim=1)


class DlibIdentityEmbedder(IdentityEmbedder):
    """dlib's 128-D ResNet (the PyTorch port) on 150 px chips from 5 points."""

    name = "dlib-resnet128"
    template = DLIB_TEMPLATE
    side = DLIB_CHIP_SIDE
    pyramid = True

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from facelora.config import DlibParams
        from facelora.prepare.faces.dlib_backend import model_path
        from facelora.prepare.faces.dlib_resnet import DlibFaceResNet, load_layers

        path = Path(weights) if weights else model_path(DlibParams(), "embedder_model")
        self.net = DlibFaceResNet(load_layers(path))
        self.freeze()

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net.descriptors(crops)  # RGB 0..255 minus dlib's mean, / 256


class ArcFaceIdentityEmbedder(IdentityEmbedder):
    """An insightface ArcFace ONNX recogniser, converted to torch, on 112 px crops."""

    template = None  # set in __init__ (insightface's arcface_dst)
    side = ARCFACE_SIDE
    pyramid = False

    def __init__(self, onnx_file: Path):
        super().__init__()
        import onnx
        from onnx2torch import convert

        model = onnx.load(str(onnx_file))
        self.name = f"arcface-{onnx_file.stem}"
        self.template = arcface_template()
        # insightface's ArcFaceONNX: graphs converted from MXNet normalise inside (a Sub and a
        # Mul among the first nodes) and take 0..255; the others take (x - 127.5) / 127.5
        names = [node.name for node in model.graph.node[:8]]
        inside = any(n.startswith(("Sub", "_minus")) for n in names) and any(
            n.startswith(("Mul", "_mul")) for n in names
        )
        self.input_mean, self.input_std = (0.0, 1.0) if inside else (127.5, 127.5)
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        self.one_at_a_time = batch.dim_value == 1  # a graph fixed to batch 1
        self.net = convert(model)
        self.freeze()

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        # insightface feeds blobFromImages(BGR image, swapRB=True): the network sees RGB
        x = (crops - self.input_mean) / self.input_std
        if self.one_at_a_time:
            return torch.cat([self.net(x[i : i + 1]) for i in range(len(x))])
        return self.net(x)


def _recognition_inputs(path: Path) -> bool:
    """Whether this ONNX graph takes one N x 3 x 112 x 112 input and gives one output."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # not a readable ONNX file
        return False
    if len(graph.input) != 1 or len(graph.output) != 1:
        return False
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    return len(dims) == 4 and dims[1:] == [3, ARCFACE_SIDE, ARCFACE_SIDE]


def arcface_onnx_file(arcface_model: str | Path | None) -> Path:
    """The recognition ONNX a setting names: the file itself, or the one 112 px recogniser
    among a pack folder's *.onnx files (buffalo_l: w600k_r50.onnx). Never downloads."""
    todo = (
        f"set {ARCFACE_SETTING} to an insightface recognition model (w600k_r50.onnx from "
        f"the buffalo_l pack, or glintr100.onnx) or to the pack folder holding it; nothing is "
        f"downloaded"
    )
    if not arcface_model:
        raise SettingsError(f"{ARCFACE_SETTING}: not set, and the arcface backend needs it; {todo}")
    path = Path(arcface_model).expanduser()
    where = f"{ARCFACE_SETTING} = {arcface_model}"
    if path.is_dir():
        found = sorted(p for p in path.glob("*.onnx") if _recognition_inputs(p))
        if not found:
            raise SettingsError(
                f"{where}: no ONNX model with a 1x3x112x112 input in that folder; {todo}"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise SettingsError(
                f"{where}: several recognition models in that folder ({names}); set "
                f"{ARCFACE_SETTING} to the one file to use"
            )
        return found[0]
    if not path.is_file():
        raise SettingsError(f"{where}: no such file or folder; {todo}")
    if not _recognition_inputs(path):
        raise SettingsError(
            f"{where}: not an ONNX face recogniser with one 1x3x112x112 input; {todo}"
        )
    return path


def load_identity_embedder(
    backend: str, arcface_model: str | Path | None = None, device=None
) -> IdentityEmbedder:
    """The frozen embedder of `backend` ('dlib', the default, or 'arcface', which needs
    `arcface_model`), in eval mode, on `device`."""
    if backend == "dlib":
        embedder: IdentityEmbedder = DlibIdentityEmbedder()
    elif backend == "arcface":
        embedder = ArcFaceIdentityEmbedder(arcface_onnx_file(arcface_model))
    else:
        raise SettingsError(
            f"{BACKEND_SETTING} = {backend!r}: unknown; choose one of {', '.join(BACKENDS)}"
        )
    if device is not None:
        embedder = embedder.to(device)
    return embedder
