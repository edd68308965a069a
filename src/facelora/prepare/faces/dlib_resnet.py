"""dlib's 128-D face embedding network, run with PyTorch on dlib's own weights file.

dlib computes this ResNet one face at a time without BLAS (about 80 ms a face on a CPU core),
the largest cost of the detect step. This module reads the weights from the same
`dlib_face_recognition_resnet_model_v1.dat` and runs the identical network in PyTorch, in
batches, several times faster; tests check it matches dlib's output (to float precision).

The file format is dlib's serialization: layer records in forward order, each opening with a
version string ("con_4", "affine_", "max_pool_2", ...), integers in a variable-length form,
scalars as (mantissa, exponent) pairs and tensors as little-endian float32 arrays. Only the
records this network uses are read; the residual wiring (blocks of conv-affine-relu-conv-affine,
added to the block input, average-pooled and zero-padded on down-sampling blocks) is dlib's
ResNet-29 face model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150
CHIP_PADDING = 0.25
_RECORD = re.compile(
    rb"\x01[\x04-\x15](con_4|affine_|max_pool_2|avg_pool_2|add_prev_|fc_2|input_rgb_image_sized)"
)


class DlibFormatError(ValueError):
    pass


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def int(self) -> int:
        control = self.data[self.pos]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise DlibFormatError(f"bad integer at byte {self.pos}")
        raw = self.data[self.pos + 1 : self.pos + 1 + size]
        self.pos += 1 + size
        value = int.from_bytes(raw, "little")
        return -value if control & 0x80 else value

    def scalar(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # dlib's markers for inf, -inf and nan
            return float("nan")
        return float(mantissa * 2.0**exponent)

    def string(self) -> str:
        length = self.int()
        text = self.data[self.pos : self.pos + length].decode("ascii")
        self.pos += length
        return text

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            raise DlibFormatError(f"unsupported tensor version at byte {self.pos}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, "<f4", count, self.pos).astype(np.float32)
        self.pos += 4 * count
        return values.reshape(shape) if count else values

    def alias(self) -> tuple[int, int, int, int]:
        if self.int() != 1:
            raise DlibFormatError(f"unsupported alias tensor version at byte {self.pos}")
        return tuple(self.int() for _ in range(4))


@dataclass
class _Layer:
    kind: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: int = 1
    padding: int = 0
    window: int = 0
    extra: dict = field(default_factory=dict)


def parse_weights(data: bytes) -> list[_Layer]:
    """The network's layers in forward order, with their weights."""
    layers = []
    for match in _RECORD.finditer(data):
        r = _Reader(data, match.start())
        kind = r.string()
        if kind == "con_4":
            params = r.tensor().reshape(-1)
            filters_n, nr, nc = r.int(), r.int(), r.int()
            stride_y, stride_x, pad_y, pad_x = r.int(), r.int(), r.int(), r.int()
            filters, biases = r.alias(), r.alias()
            n = int(np.prod(filters))
            if (
                filters[0] != filters_n
                or (filters[2], filters[3]) != (nr, nc)
                or stride_y != stride_x
            ):
                raise DlibFormatError(f"unexpected convolution at byte {match.start()}")
            if len(params) != n + int(np.prod(biases)):
                raise DlibFormatError(f"unexpected convolution at byte {match.start()}")
            weight, bias = params[:n].reshape(filters), params[n:].reshape(-1)
            layers.append(_Layer("con", weight, bias, stride=stride_y, padding=pad_y))
        elif kind == "affine_":
            params = r.tensor().reshape(-1)
            gamma, _ = r.alias(), r.alias()
            k = int(np.prod(gamma))
            layers.append(_Layer("affine", params[:k], params[k:]))
        elif kind in ("max_pool_2", "avg_pool_2"):
            nr, nc, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(6))
            if nr != nc or stride_y != stride_x or pad_y != pad_x:
                raise DlibFormatError(f"unexpected pooling at byte {match.start()}")
            layers.append(_Layer(kind[:-2], stride=stride_y, padding=pad_y, window=nr))
        elif kind == "add_prev_":
            layers.append(_Layer("add_prev"))
        elif kind == "fc_2":
            outputs, inputs = r.int(), r.int()
            params = r.tensor().reshape(-1)
            layers.append(_Layer("fc", params[: inputs * outputs].reshape(inputs, outputs)))
        else:  # input_rgb_image_sized: per-channel means
            layers.append(_Layer("input", extra={"mean": [r.scalar() for _ in range(3)]}))
    return layers


def load_layers(path: str | Path) -> list[_Layer]:
    """Parsed layers of a dlib .dat file (about 0.4 s for the 22 MB face model)."""
    return parse_weights(Path(path).read_bytes())


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b where a smaller tensor counts as zero outside its extent (dlib's add)."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def grow(t: torch.Tensor) -> torch.Tensor:
        pad = [0, shape[2] - t.shape[3], 0, shape[1] - t.shape[2], 0, shape[0] - t.shape[1]]
        return F.pad(t, pad) if any(pad) else t

    return grow(a) + grow(b)


class DlibFaceResNet(torch.nn.Module):
    """Chips (N x 150 x 150 x 3 uint8 RGB, from dlib.get_face_chip) -> N x 128 descriptors.

    `forward` runs under inference_mode (the detect step's path); `descriptors` is the same
    network on float N x 3 x H x W RGB in 0..255, differentiable with respect to its input
    (the identity loss's path). The weights are frozen parameters (requires_grad False).
    """

    def __init__(self, layers: list[_Layer]):
        super().__init__()
        kinds = [layer.kind for layer in layers]
        if kinds[:4] != ["input", "con", "affine", "max_pool"] or kinds[-2:] != ["avg_pool", "fc"]:
            raise DlibFormatError("not dlib's face recognition ResNet (unexpected layer order)")
        mean = torch.tensor(layers[0].extra["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.layers = layers[1:]
        for i, layer in enumerate(self.layers):
            for part in ("weight", "bias"):
                value = getattr(layer, part)
                if value is not None:
                    tensor = torch.from_numpy(value.copy())
                    self.register_parameter(
                        f"layer{i}_{part}", torch.nn.Parameter(tensor, requires_grad=False)
                    )

    def _tensor(self, i: int, part: str) -> torch.Tensor | None:
        return getattr(self, f"layer{i}_{part}", None)

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        weight, bias = self._tensor(i, "weight"), self._tensor(i, "bias")
        if layer.kind == "con":
            return F.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding)
        if layer.kind == "affine":
            return x * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        if layer.kind == "max_pool":
            return F.max_pool2d(x, layer.window, layer.stride, layer.padding)
        if layer.window == 0:  # avg_pool_everything
            return x.mean(dim=(2, 3), keepdim=True)
        return F.avg_pool2d(x, layer.window, layer.stride, layer.padding)

    @torch.inference_mode()
    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return self.descriptors(chips.permute(0, 3, 1, 2).float())

    def descriptors(self, rgb: torch.Tensor) -> torch.Tensor:
        """N x 3 x 150 x 150 float RGB (0..255) -> N x 128 descriptors (not normalised)."""
        x = (rgb - self.mean) / 256.0
        x = F.relu(self._layer(1, self._layer(0, x)))  # stem: conv 7x7/2, affine, relu
        x = self._layer(2, x)  # max pool 3x3/2
        i, kinds = 3, [layer.kind for layer in self.layers]
        while kinds[i] == "con":  # residual blocks
            shortcut = x
            y = F.relu(self._layer(i + 1, self._layer(i, x)))
            y = self._layer(i + 3, self._layer(i + 2, y))
            i += 4
            if kinds[i] == "avg_pool":  # a down-sampling block pools its input
                shortcut = self._layer(i, shortcut)
                i += 1
            if kinds[i] != "add_prev":
                raise DlibFormatError("unexpected residual block layout")
            x = F.relu(_add_zero_padded(y, shortcut))
            i += 1
        x = self._layer(i, x).flatten(1)  # global average
        return x @ self._tensor(i + 1, "weight")
