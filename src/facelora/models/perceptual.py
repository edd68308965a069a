"""Frozen perceptual networks read from local files: LPIPS (torchvision backbone + the lpips
package's linear heads) and CLIP (a transformers CLIPModel folder).

Evaluation scores with them and training's auxiliary losses use them as loss networks, so
they load here, once, for both. Nothing is downloaded: a missing file is an error the caller
words with its own setting's name.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


class BackboneUnavailable(Exception):
    pass


# torchvision constructor and official weights per LPIPS backbone
_TV_MODELS = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


def official_backbone_name(net: str) -> str:
    """The file name torchvision gives the ImageNet checkpoint in the hub cache."""
    import torchvision.models as tvm

    url = getattr(tvm, _TV_MODELS[net][1]).IMAGENET1K_V1.url
    return url.rsplit("/", 1)[-1]


def default_backbone_path(net: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / official_backbone_name(net)


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@cache
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_lpips(net: str, backbone: Path) -> Any:
    """lpips.LPIPS with the package's linear heads and the backbone read from `backbone`.

    Nothing is downloaded: the torchvision model is built with weights=None, its state dict
    loaded from the file (strict), and copied into lpips' backbone slices.
    """
    import lpips
    import torch
    import torchvision.models as tvm

    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not heads.is_file():
        raise BackboneUnavailable(f"the lpips package lacks its linear heads ({heads})")
    try:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneUnavailable(f"{backbone}: not a readable state dict ({exc})") from None
    if not isinstance(state, Mapping):
        raise BackboneUnavailable(f"{backbone}: holds a {type(state).__name__}, not a state dict")
    with torch.device("meta"):  # no random init: every weight comes from the file
        tv_model = getattr(tvm, _TV_MODELS[net][0])(weights=None)
    try:
        tv_model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BackboneUnavailable(
            f"{backbone}: not a torchvision {_TV_MODELS[net][0]} state dict ({first})"
        ) from None
    with warnings.catch_warnings():  # lpips passes the deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    missing, unexpected = model.load_state_dict(
        torch.load(heads, map_location="cpu", weights_only=True), strict=False
    )
    if unexpected or any(re.fullmatch(r"lin\d\..*", k) for k in missing):
        raise BackboneUnavailable(f"{heads}: linear heads do not fit lpips' {net} model")
    features = tv_model.features.state_dict()
    mapped = {}
    for key in model.net.state_dict():
        source_key = key.split(".", 1)[1]  # slice3.5.weight -> 5.weight (features index)
        mapped[key] = features[source_key]
    model.net.load_state_dict(mapped, strict=True)
    if any(t.is_meta for t in model.state_dict().values()):
        raise BackboneUnavailable(f"{backbone}: some {net} weights were not in the file")
    model.eval().requires_grad_(False)
    return model


@dataclass(frozen=True)
class LpipsBackbone:
    path: Path
    sha256: str
    official: bool  # the file is torchvision's own ImageNet checkpoint


def find_lpips_backbone(
    net: str, configured: str | None, setting: str, net_setting: str
) -> LpipsBackbone:
    """The backbone file for LPIPS with `net`: `configured` (any file the user names), or the
    official checkpoint in the torch hub cache, refused there unless its hash matches (a random
    or damaged file in the cache would make the distance meaningless)."""
    official = official_backbone_name(net)
    expected = _HASH_IN_NAME.search(official)
    prefix = expected.group(1) if expected else ""
    path = Path(configured).expanduser() if configured else default_backbone_path(net)
    if not path.is_file():
        if configured:
            raise BackboneUnavailable(f"{setting} = {configured}: file not found")
        raise BackboneUnavailable(
            f"LPIPS ({net_setting} = {net}) needs torchvision's ImageNet "
            f"{_TV_MODELS[net][0]} weights: {path} not found. Copy {official} into the torch "
            f"hub cache or set {setting} to a local copy (nothing is downloaded)"
        )
    sha = file_sha256(path)
    is_official = bool(prefix) and sha.startswith(prefix)
    if not configured and not is_official:
        raise BackboneUnavailable(
            f"{path}: SHA-256 {sha[:8]}... does not match the official checkpoint "
            f"({prefix}...): not used, random or damaged weights give meaningless LPIPS; "
            f"replace the file or set {setting}"
        )
    return LpipsBackbone(path, sha, is_official)


def load_clip(folder: str | None, setting: str) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a local folder saved with save_pretrained, frozen."""
    if not folder:
        raise BackboneUnavailable(
            f"{setting} is not set: it needs a local CLIP model folder (a transformers "
            "CLIPModel saved with save_pretrained); nothing is downloaded"
        )
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise BackboneUnavailable(
            f"{setting} = {folder}: no CLIP model folder there (config.json not found)"
        )
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneUnavailable(f"{setting} = {folder}: cannot load CLIP ({first})") from None
    return model.eval().requires_grad_(False), processor
