"""The identity loss's frozen, differentiable face embedders (train.identity): the torch
alignment against cv2 and insightface, the dlib embedder against dlib's own descriptors, and an
ArcFace ONNX (a random-weight stand-in with the real model's shapes and ops) against
onnxruntime, on real photos from ../shared/faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from facelora.config import DlibParams
from facelora.errors import SettingsError
from facelora.prepare.faces.dlib_backend import CHIP_PADDING, CHIP_SIZE, five_from_68, model_path
from facelora.train.identity import (
    ARCFACE_SETTING,
    DLIB_TEMPLATE,
    align,
    arcface_template,
    dlib_chip_matrix,
    load_identity_embedder,
    similarity_matrix,
    warp,
)

from helpers import make_pack

# one photo per person (large faces among them, so the pyramid is used), and a group photo
PHOTOS = [
    ("same_person/obama/obama.jpg", "obama"),
    ("same_person/biden/biden2.jpg", "biden"),
    ("same_person/lennon/lennon-2.jpg", "lennon"),
    ("same_person/rose_leslie/img1.jpg", "rose_leslie"),
    ("same_person/kit_harington/john2.jpeg", "kit_harington"),
    ("same_person/deepface_id_img3/img53.jpg", "deepface_id_img3"),
    ("group/insightface_t1.jpg", None),
]


def rgb_of(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))


@pytest.fixture(scope="module")
def dlib_models():
    params = DlibParams()
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(model_path(params, "landmarks_model"))),
    )


@pytest.fixture(scope="module")
def faces(shared_faces, dlib_models):
    """(name, identity, rgb, 68-point shape, 5 canonical points) of every face dlib finds."""
    detector, predictor = dlib_models
    found = []
    for name, identity in PHOTOS:
        rgb = rgb_of(shared_faces / name)
        for rect in detector(rgb, 1):
            shape = predictor(rgb, rect)
            found.append((name, identity, rgb, shape, five_from_68(shape)))
    assert len(found) >= 12
    return found


def pixels_of(rgb: np.ndarray) -> torch.Tensor:
    """A (1, 3, H, W) tensor in [-1, 1], as a VAE decodes."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


# --- alignment -------------------------------------------------------------------------------


def test_the_arcface_matrix_is_insightfaces(faces):
    """Our least-squares similarity is insightface's estimate_norm (skimage's Umeyama, which
    computes in float32 on its float32 points: hence 1e-4 px) and, in float64, skimage's."""
    from insightface.utils.face_align import estimate_norm
    from skimage.transform import SimilarityTransform

    landmarks = torch.from_numpy(np.stack([f[4] for f in faces]))
    for side in (112, 224):  # 224: insightface's template scaled by 2
        got = similarity_matrix(landmarks, arcface_template() * side / 112).numpy()
        with pytest.warns(FutureWarning):  # skimage 0.26 deprecates estimate()
            expected = np.stack([estimate_norm(f[4], side) for f in faces])
        assert got.shape == (len(faces), 2, 3)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    exact = np.stack(
        [
            SimilarityTransform.from_estimate(f[4].astype(np.float64), arcface_template()).params[
                :2
            ]
            for f in faces
        ]
    )
    np.testing.assert_allclose(similarity_matrix(landmarks, arcface_template()), exact, atol=1e-9)


def test_the_torch_warp_is_cv2_warp_affine(faces):
    """Same crop as cv2.warpAffine(INTER_LINEAR) with the same M, to well under a grey level
    (cv2 rounds coordinates to 1/32 pixel and weights to fixed point), also where the crop
    leaves the image (black there)."""
    from insightface.utils.face_align import estimate_norm

    worst = 0.0
    for _, _, rgb, _, five in faces:
        for matrix, side in [
            (estimate_norm(five, 112), 112),
            (similarity_matrix(torch.from_numpy(five)[None], DLIB_TEMPLATE)[0].numpy(), 150),
            # zoomed far out: most of the crop lies outside the image
            (estimate_norm(five, 112) * np.array([[0.2], [0.2]]), 112),
        ]:
            expected = cv2.warpAffine(rgb, matrix, (side, side), flags=cv2.INTER_LINEAR)
            image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
            got = warp(image, torch.from_numpy(matrix)[None], side)[0].permute(1, 2, 0).numpy()
            diff = np.abs(got - expected.astype(np.float32))
            worst = max(worst, float(diff.mean()))
            assert diff.mean() < 0.3, diff.mean()
            assert np.percentile(diff, 99) < 2.0
    print(f"torch warp vs cv2.warpAffine: worst mean abs difference {worst:.3f} grey levels")


def test_the_warp_of_a_batch_is_each_warp(faces):
    rgb = faces[0][2]
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().repeat(3, 1, 1, 1)
    landmarks = torch.from_numpy(np.stack([f[4] for f in faces[:3]]))
    both = align(image, landmarks, DLIB_TEMPLATE, 150)
    each = torch.cat([align(image[:1], landmarks[i : i + 1], DLIB_TEMPLATE, 150) for i in range(3)])
    assert torch.allclose(both, each, atol=1e-4)


def test_the_dlib_chip_matrix_is_dlibs_chip(faces):
    """dlib_chip_matrix (used to derive DLIB_TEMPLATE) is the mapping get_face_chip samples
    with: the same chip within a grey level where dlib needs no pyramid (face under 300 px)."""
    checked = 0
    for _, _, rgb, shape, _ in faces:
        details = dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
        if details.rect.width() >= 2 * CHIP_SIZE:
            continue
        chip = dlib.get_face_chip(rgb, shape, CHIP_SIZE, CHIP_PADDING)
        ours = cv2.warpAffine(rgb, dlib_chip_matrix(details), (CHIP_SIZE, CHIP_SIZE))
        assert np.abs(ours.astype(float) - chip).mean() < 1.0
        checked += 1
    assert checked >= 6


def test_the_dlib_template_rederived(shared_faces, dlib_models):
    """DLIB_TEMPLATE: where the 5 canonical points of every face dlib's HOG detector finds in
    ../shared/faces land in dlib's 150 px chip, averaged."""
    detector, predictor = dlib_models
    points = []
    photos = sorted(
        p
        for p in shared_faces.rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and "no_face" not in p.parts
    )
    for path in photos:
        rgb = rgb_of(path)
        for rect in detector(rgb, 1):
            shape = predictor(rgb, rect)
            m = dlib_chip_matrix(dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING))
            points.append(five_from_68(shape).astype(np.float64) @ m[:, :2].T + m[:, 2])
    assert len(points) >= 30
    derived = np.mean(points, axis=0)
    assert np.abs(derived - DLIB_TEMPLATE).max() < 0.5, np.round(derived, 4)


# --- the dlib embedder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_embedder():
    torch.set_num_threads(2)
    return load_identity_embedder("dlib", None, "cpu")


def test_dlib_embedder_matches_dlibs_descriptor(faces, dlib_embedder):
    """Our 5-point torch alignment + the ResNet port vs dlib's compute_face_descriptor on its
    68-point chip: cosine > 0.98 for the same face; another person's face is clearly lower."""
    reference = dlib.face_recognition_model_v1(str(model_path(DlibParams(), "embedder_model")))
    ours, theirs, who = [], [], []
    for name, identity, rgb, shape, five in faces:
        with torch.no_grad():
            e = dlib_embedder(pixels_of(rgb), torch.from_numpy(five)[None])
        assert e.shape == (1, 128)
        assert abs(float(e.norm()) - 1.0) < 1e-5
        d = np.array(reference.compute_face_descriptor(rgb, shape))
        ours.append(e[0].numpy())
        theirs.append(d / np.linalg.norm(d))
        who.append(identity or f"{name}#{len(who)}")
    cos = np.stack(ours) @ np.stack(theirs).T
    same = np.diag(cos)
    others = cos[~np.eye(len(who), dtype=bool)]
    print(
        f"dlib port (5-point alignment) vs dlib: cosine min {same.min():.4f}, mean "
        f"{same.mean():.4f} over {len(who)} faces; other faces max {others.max():.4f}, "
        f"mean {others.mean():.4f}"
    )
    assert same.min() > 0.98
    assert others.max() < same.min() - 0.03


def test_dlib_embedder_is_frozen_and_differentiable(faces, dlib_embedder):
    check_frozen_and_differentiable(dlib_embedder, faces[:2])
    assert dlib_embedder.name == "dlib-resnet128"


def check_frozen_and_differentiable(embedder, faces):
    """Pixel gradients flow; no parameter gets one; the weights are byte-identical after."""
    assert not embedder.training
    params = list(embedder.parameters())
    assert params and not any(p.requires_grad for p in params)
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    embedder.train()  # a training loop's model.train() must not wake BatchNorm statistics
    assert not embedder.training and not any(m.training for m in embedder.modules())
    # two faces of different photos, cropped to one size, as one batch
    side = 320
    pixels, landmarks = [], []
    for _, _, rgb, _, five in faces:
        m = similarity_matrix(torch.from_numpy(five)[None], DLIB_TEMPLATE * side / 150)
        crop = cv2.warpAffine(rgb, m[0].numpy(), (side, side), flags=cv2.INTER_LINEAR)
        pixels.append(pixels_of(crop))
        landmarks.append(five.astype(np.float64) @ m[0, :, :2].numpy().T + m[0, :, 2].numpy())
    x = torch.cat(pixels).requires_grad_(True)
    target = embedder(x.detach(), torch.from_numpy(np.stack(landmarks)).float())
    edited = embedder(x, torch.from_numpy(np.stack(landmarks)).float())
    loss = (1 - (edited * target).sum(dim=1)).sum() + edited[:, 0].sum()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in embedder.parameters())
    after = embedder.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert v.dtype == after[k].dtype
        assert v.numpy().tobytes() == after[k].numpy().tobytes(), k


# --- the ArcFace embedder (a stand-in ONNX with w600k_r50's shapes and ops) ------------------

# insightface's buffalo_l w600k_r50.onnx (arcface_torch's iresnet50, exported from PyTorch):
# Conv, BatchNormalization, PRelu, Add (the residual blocks), then BatchNormalization, Flatten,
# Gemm (fc) and a BatchNormalization on the 512 features; input "input.1" 1x3x112x112 (batch
# dynamic), output 1x512, preprocessing (x - 127.5) / 127.5 on RGB.
ARCFACE_OPS = {"Conv", "BatchNormalization", "PRelu", "Add", "Flatten", "Gemm"}


class _Block(torch.nn.Module):
    """iresnet's IBasicBlock: BN-conv-BN-PReLU-conv(stride)-BN plus a 1x1 downsample."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.body(x) + self.down(x)


class _TinyIResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.prelu = nn.PReLU(8)
        self.layers = nn.Sequential(_Block(8, 16), _Block(16, 16), _Block(16, 32), _Block(32, 32))
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512)

    def forward(self, x):
        x = self.bn2(self.layers(self.prelu(self.stem(x))))
        return self.features(self.fc(torch.flatten(x, 1)))


def write_tiny_arcface(path: Path) -> None:
    """A random-weight (seed 0) stand-in for an ArcFace recogniser, exported to ONNX: a test
    fixture only, never a model."""
    net = _TinyIResNet()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights and statistics (no two initialisers alike)
        for name, p in net.named_parameters():
            base = 1.0 if "weight" in name and p.ndim == 1 and "prelu" not in name else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    net.eval()
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 112, 112),
        str(path),
        input_names=["input.1"],
        output_names=["fc1"],
        dynamic_axes={"input.1": {0: "None"}, "fc1": {0: "None"}},
        opset_version=11,
        dynamo=False,
    )


@pytest.fixture(scope="module")
def arcface_pack(tmp_path_factory) -> Path:
    """A buffalo_l-like pack folder: a detector, the landmark and gender/age decoys (other
    input sizes) and the stand-in recogniser as w600k_r50.onnx."""
    import warnings

    folder = make_pack(tmp_path_factory.mktemp("insightface"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
        write_tiny_arcface(folder / "w600k_r50.onnx")
    return folder


def test_the_stand_in_uses_the_real_models_ops(arcface_pack):
    import onnx

    ops = {n.op_type for n in onnx.load(str(arcface_pack / "w600k_r50.onnx")).graph.node}
    assert ops >= ARCFACE_OPS, ops


@pytest.fixture(scope="module")
def arcface_embedder(arcface_pack):
    return load_identity_embedder("arcface", arcface_pack, "cpu")


def test_arcface_matches_onnxruntime(faces, arcface_pack, arcface_embedder):
    """The converted network on insightface's own crops (norm_crop of the BGR image) gives
    insightface's ArcFaceONNX.get_feat features (onnxruntime, its normalisation and channel
    swap); our whole torch path (align + network) gives the same embedding."""
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils.face_align import norm_crop

    assert arcface_embedder.name == "arcface-w600k_r50"
    reference = ArcFaceONNX(str(arcface_pack / "w600k_r50.onnx"))
    worst, worst_cos = 0.0, 1.0
    for _, _, rgb, _, five in faces:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        crop_bgr = norm_crop(bgr, five, 112)
        expected = reference.get_feat(crop_bgr)  # (1, 512)
        crop_rgb = torch.from_numpy(crop_bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            got = arcface_embedder.embed_crops(crop_rgb).numpy()
            whole = arcface_embedder(pixels_of(rgb), torch.from_numpy(five)[None]).numpy()
        assert got.shape == expected.shape == (1, 512)
        scale = np.abs(expected).max()
        worst = max(worst, float(np.abs(got - expected).max() / max(scale, 1.0)))
        assert np.abs(got - expected).max() < 1e-4 * max(scale, 1.0)
        unit = expected / np.linalg.norm(expected)
        assert np.abs(got / np.linalg.norm(got) - unit).max() < 1e-5
        with torch.no_grad():  # the check sees a channel swap
            swapped = arcface_embedder.embed_crops(crop_rgb.flip(1)).numpy()
        assert np.abs(swapped - expected).max() > 100 * np.abs(got - expected).max()
        worst_cos = min(worst_cos, float((whole * unit).sum()))
    print(
        f"ArcFace onnx2torch vs onnxruntime: max abs difference {worst:.2e} (features); "
        f"whole torch path vs insightface: cosine min {worst_cos:.5f}"
    )
    assert worst_cos > 0.999


def test_arcface_embedder_is_frozen_and_differentiable(faces, arcface_embedder):
    check_frozen_and_differentiable(arcface_embedder, faces[:2])


def test_arcface_model_setting_errors(tmp_path, arcface_pack):
    with pytest.raises(SettingsError, match=f"{ARCFACE_SETTING}: not set"):
        load_identity_embedder("arcface", None, "cpu")
    with pytest.raises(SettingsError, match=f"{ARCFACE_SETTING} = .*no such file"):
        load_identity_embedder("arcface", tmp_path / "buffalo_l", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.onnx").write_text("not onnx")
    with pytest.raises(SettingsError, match="no ONNX model with a 1x3x112x112 input"):
        load_identity_embedder("arcface", empty, "cpu")
    with pytest.raises(SettingsError, match="not an ONNX face recogniser"):
        load_identity_embedder("arcface", arcface_pack / "det_10g.onnx", "cpu")
    with pytest.raises(SettingsError, match="w600k_r50.onnx"):  # says what to set
        load_identity_embedder("arcface", empty / "notes.onnx", "cpu")
    with pytest.raises(SettingsError, match="unknown"):
        load_identity_embedder("facenet", None, "cpu")
    # a file path works as well as the pack folder
    assert load_identity_embedder("arcface", arcface_pack / "w600k_r50.onnx").name == (
        "arcface-w600k_r50"
    )
