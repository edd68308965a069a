"""The PyTorch run of dlib's face embedding network gives dlib's own descriptors."""

import dlib
import numpy as np
import pytest
import torch

from facelora.config import DlibParams
from facelora.prepare.faces.dlib_backend import CHIP_PADDING, CHIP_SIZE, DlibEmbedder, model_path
from facelora.prepare.faces.dlib_resnet import (
    DlibFaceResNet,
    DlibFormatError,
    load_layers,
    parse_weights,
)


@pytest.fixture(scope="module")
def faces(sample_raw):
    """Face chips of several people (and dlib's own descriptors of them)."""
    from PIL import Image

    params = DlibParams()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model_path(params, "landmarks_model")))
    reference = dlib.face_recognition_model_v1(str(model_path(params, "embedder_model")))
    chips, expected = [], []
    for name in [
        "kontext/group_glasses_start.jpg",
        "manifest/before/t1_person4_restore.jpg",
        "kontext/grace_hopper_restore_start.jpg",
    ]:
        img = Image.open(sample_raw / name).convert("RGB")
        img.thumbnail((1024, 1024))
        rgb = np.asarray(img)
        for rect in detector(rgb, 0):
            shape = predictor(rgb, rect)
            chips.append(dlib.get_face_chip(rgb, shape, CHIP_SIZE, CHIP_PADDING))
            expected.append(np.array(reference.compute_face_descriptor(rgb, shape)))
    assert len(chips) >= 6
    return np.stack(chips), np.stack(expected)


def test_matches_dlib_to_float_precision(faces):
    chips, expected = faces
    net = DlibFaceResNet(load_layers(model_path(DlibParams(), "embedder_model")))
    torch.set_num_threads(1)
    got = net(torch.from_numpy(chips)).numpy()
    assert got.shape == expected.shape == (len(chips), 128)
    assert np.abs(got - expected).max() < 1e-4
    # one at a time and in a batch: the same numbers
    single = np.concatenate([net(torch.from_numpy(c[None])).numpy() for c in chips])
    assert np.abs(single - got).max() < 1e-5


def test_both_runtimes_of_the_embedder_agree(sample_raw, faces):
    from PIL import Image

    img = Image.open(sample_raw / "kontext/group_glasses_start.jpg").convert("RGB")
    rgb = np.asarray(img)
    rects = dlib.get_frontal_face_detector()(rgb, 0)
    torch_side = DlibEmbedder(DlibParams(embedder_runtime="torch"))
    dlib_side = DlibEmbedder(DlibParams(embedder_runtime="dlib"))
    shapes = [
        torch_side.shape(rgb, np.array([r.left(), r.top(), r.right(), r.bottom()])) for r in rects
    ]
    assert np.abs(torch_side.embed(rgb, shapes) - dlib_side.embed(rgb, shapes)).max() < 1e-4


def test_other_files_are_refused(tmp_path):
    assert parse_weights(b"not a dlib file at all") == []
    predictor = model_path(DlibParams(), "landmarks_model")
    with pytest.raises(DlibFormatError, match="not dlib's face recognition ResNet"):
        DlibFaceResNet(load_layers(predictor))
