"""What differs between the model families during training, behind one small interface.

Each adapter loads the real diffusers pipeline from the model folder and uses the pipeline's
own encoding and packing functions, so training feeds the transformer exactly what inference
feeds it (latent normalisation, packing, image shapes / position ids, prompt template):

- qwen_image_edit (QwenImageEditPlusPipeline): the prompt is encoded by Qwen2.5-VL together
  with the control images (at the pipeline's condition size); latents are packed 2x2; the
  control latents follow the target in the sequence and `img_shapes` lists target first, so
  with zero_cond_t the controls get t=0.
- flux2_klein (Flux2KleinPipeline): the prompt is encoded by Qwen3 alone (hidden states of
  the pipeline's output layers); latents are patchified and batch-norm normalised; up to 4
  reference latents follow the target with their own position ids (t = 10, 20, ...).

Both are rectified flows: the transformer gets sigma as `timestep` and predicts noise - x0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facelora.errors import ModelFileMissing, SettingsError
from facelora.registry.families import Family
from facelora.registry.families import family as get_family

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelRefused(SettingsError):
    """The model folder is not one facelora can train (the message says why)."""


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """model.dtype's name as a torch dtype (a dtype passes through)."""
    return DTYPES[name] if isinstance(name, str) else name


def reference_sizes(family: str, model_folder: str | Path | None) -> AbstractContextManager:
    """The pipeline's reference image sizes for the duration: lowered for the tiny test
    models of a family whose pipeline fixes them (training and sampling alike, so the start
    latents the transformer sees at inference are the ones it was trained with); the real
    ones otherwise."""
    from facelora.models.tiny import read_marker, small_reference_sizes

    tiny = model_folder is not None and read_marker(model_folder) is not None
    if tiny and get_family(family).fixed_reference_sizes:
        return small_reference_sizes()
    return nullcontext()


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def check_model_folder(path: str | Path, family: str) -> dict:
    """The folder's model_index.json, after the checks that refuse a wrong model."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFileMissing(
            f"model.path = {path}: no diffusers model folder there (model_index.json missing); "
            f"set model.path to a local copy of the model, or build the demo's tiny model with "
            f"`facelora make-tiny-model {family} {path}`"
        )
    info = json.loads(index.read_text())
    record = get_family(family)
    if info.get("_class_name") != record.pipeline_class:
        raise ModelRefused(
            f"model.path = {path} holds a {info.get('_class_name')}, not the "
            f"{record.pipeline_class} that model.family {family} trains"
        )
    for flag, reason in record.refused_flags.items():
        if info.get(flag):
            raise ModelRefused(f"model.path = {path} {reason}")
    return info


ADAPTERS: dict[str, type[FamilyAdapter]] = {}  # family name -> adapter (filled by subclasses)


class FamilyAdapter:
    """What training needs of a family's pipeline. A subclass names its registry record
    (`family`) and registers itself; the record holds the family's facts."""

    family: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ADAPTERS[get_family(cls.family).name] = cls

    @property
    def record(self) -> Family:
        return get_family(self.family)

    def __init__(
        self,
        path: str | Path,
        dtype: str,
        device: torch.device,
        quantize: str = "none",
        transformer_device: torch.device | None = None,
    ):
        check_model_folder(path, self.family)
        self.path = Path(path)
        self.device = device
        self.dtype = torch_dtype(dtype)
        self.pipe = load_quantized_pipeline(
            self.family, self.path, self.dtype, device, quantize, transformer_device
        )
        for name in ("transformer", "vae", "text_encoder"):
            getattr(self.pipe, name).requires_grad_(False)
        self.transformer = self.pipe.transformer
        self.encoders_aside = False
        self.aside: tuple[str, ...] = ()

    # -- the encoders' place -----------------------------------------------------------------

    ENCODERS = ("vae", "text_encoder")

    def set_encoders_aside(self, keep_vae: bool = False) -> None:
        """Move the VAE and the text encoder to CPU memory: training reads their outputs from
        the cache, and on a GPU they would hold memory the whole run (Qwen2.5-VL 7B, Qwen3 8B:
        about 16 GB in bf16). `encoders_on_device` brings them back for any later encoding.
        keep_vae: the VAE stays (loss terms on decoded images need its decoder every step)."""
        self.aside = tuple(n for n in self.ENCODERS if not (keep_vae and n == "vae"))
        for name in self.aside:
            getattr(self.pipe, name).to("cpu")
        self.encoders_aside = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """The encoders on the training device for the duration (a no-op unless set aside)."""
        if not self.encoders_aside:
            yield
            return
        for name in self.aside:
            getattr(self.pipe, name).to(self.device)
        try:
            yield
        finally:
            for name in self.aside:
                getattr(self.pipe, name).to("cpu")

    def reference_sizes(self) -> AbstractContextManager:
        return reference_sizes(self.family, self.path)

    # -- identity for caches -----------------------------------------------------------------

    def component_identity(self, *components: str) -> str:
        """What decides an encoding: the components' configs and weight files (name, size)."""
        parts = [self.family, str(self.dtype)]
        for name in components:
            folder = self.path / name
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                if f.suffix == ".json":
                    parts.append(f"{name}/{f.name}:{f.read_text()}")
                elif f.is_file():
                    parts.append(f"{name}/{f.name}:{f.stat().st_size}")
        return "\n".join(parts)

    # -- interface ---------------------------------------------------------------------------

    def encode_latents(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> normalised latents in the model's channel space."""
        raise NotImplementedError

    def encode_text(
        self, caption: str, controls: list[Image.Image], grad: bool = False
    ) -> torch.Tensor:
        """One prompt -> (L, D) embeddings (padding removed where the model allows); with
        grad, gradients reach the text encoder (lora.train_text_encoder)."""
        raise NotImplementedError

    def predict(
        self,
        noisy: torch.Tensor,
        controls: list[torch.Tensor],
        text: list[torch.Tensor],
        sigma: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity prediction for the noisy target latents (same shape as `noisy`)."""
        raise NotImplementedError

    def default_shift(self, latents: torch.Tensor) -> float:
        """The model's own resolution-dependent shift for sigma (shift sampling)."""
        raise NotImplementedError

    @property
    def latent_cell(self) -> int:
        """Pixels per side of one cell of the latents `encode_latents` returns."""
        return self.pipe.vae_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as `encode_latents` returns them (B, ..., h, w), or a window of them ->
        (B, 3, h x cell, w x cell) pixels in about [-1, 1], float32. The normalisation is
        undone and gradients flow through the (frozen) decoder to the latents."""
        raise NotImplementedError

    def pool_weights(self, pixel_weights: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) per-pixel loss weights at the training size -> (B, 1, H/f, W/f): the
        mean over each cell of the VAE's latent grid (f = its downsampling factor)."""
        f = self.pipe.vae_scale_factor
        if pixel_weights.shape[2] % f or pixel_weights.shape[3] % f:
            raise ValueError(f"weights of {tuple(pixel_weights.shape)}: sides must divide by {f}")
        return torch.nn.functional.avg_pool2d(pixel_weights, f)

    def layout_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """pool_weights' output laid out like this family's latents (as `encode_latents` and
        `predict` return them), so that it broadcasts element for element against them."""
        raise NotImplementedError

    def latent_weights(self, pixel_weights: torch.Tensor) -> torch.Tensor:
        return self.layout_weights(self.pool_weights(pixel_weights))


class QwenImageEdit(FamilyAdapter):
    family = "qwen_image_edit"

    def encode_latents(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image.to(self.device, self.dtype).unsqueeze(2)  # (1, 3, 1, H, W): video VAE
        with torch.no_grad():
            latents = self.pipe._encode_vae_image(pixels, generator=None)
        return latents[:, :, 0]  # (1, 16, h, w)

    def _condition_image(self, image: Image.Image) -> Image.Image:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        w, h = module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, image.width / image.height)
        return self.pipe.image_processor.resize(image, h, w)

    def encode_text(
        self, caption: str, controls: list[Image.Image], grad: bool = False
    ) -> torch.Tensor:
        with self.reference_sizes():
            conditions = [self._condition_image(c) for c in controls]
        with _grad(grad):
            embeds, mask = self.pipe.encode_prompt(
                prompt=[caption], image=conditions or None, device=self.device
            )
        if mask is not None:
            embeds = embeds[:, : int(mask[0].sum())]
        return embeds[0]

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def predict(self, noisy, controls, text, sigma):
        b, c, h, w = noisy.shape
        tokens = self._pack(noisy)
        sequence = torch.cat([tokens, *[self._pack(x) for x in controls]], dim=1)
        shapes = [(1, h // 2, w // 2)] + [(1, x.shape[2] // 2, x.shape[3] // 2) for x in controls]
        embeds, mask = _pad_text(text, self.device, self.dtype)
        out = self.transformer(
            hidden_states=sequence.to(self.dtype),
            timestep=sigma.to(self.device, self.dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        pred = out[:, : tokens.shape[1]]
        # unpack to (b, c, h, w): the inverse of the pipeline's 2x2 packing
        pred = pred.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return pred.reshape(b, c, h, w)

    def default_shift(self, latents: torch.Tensor) -> float:
        seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        return shift_from_mu(linear_shift_mu(seq_len, dict(self.pipe.scheduler.config)))

    def layout_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        # predict unpacks the 2x2 tokens back to the VAE grid: one weight per cell, every
        # channel alike (broadcast)
        return pooled

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        std = torch.tensor(vae.config.latents_std).view(shape)
        z = latents * std.to(latents) + mean.to(latents)  # undo _encode_vae_image
        pixels = vae.decode(z.to(vae.dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
        return pixels.float()


class Flux2Klein(FamilyAdapter):
    family = "flux2_klein"

    def encode_latents(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe._encode_vae_image(image.to(self.device, self.dtype), generator=None)

    def encode_text(
        self, caption: str, controls: list[Image.Image], grad: bool = False
    ) -> torch.Tensor:
        with _grad(grad):
            embeds, _ = self.pipe.encode_prompt(
                prompt=[caption],
                device=self.device,
                max_sequence_length=self.record.max_text_tokens,
                text_encoder_out_layers=self.record.text_encoder_out_layers,
            )
        return embeds[0]  # (512, D): Klein attends to its padding too, as at inference

    def predict(self, noisy, controls, text, sigma):
        b = noisy.shape[0]
        tokens = self.pipe._pack_latents(noisy)
        ids = self.pipe._prepare_latent_ids(noisy)
        parts, part_ids = [tokens], [ids]
        if controls:
            ref_ids = self.pipe._prepare_image_ids([x[:1] for x in controls])
            parts += [self.pipe._pack_latents(x) for x in controls]
            part_ids.append(ref_ids.expand(b, -1, -1))
        embeds = torch.stack(text).to(self.device, self.dtype)
        out = self.transformer(
            hidden_states=torch.cat(parts, dim=1).to(self.dtype),
            timestep=sigma.to(self.device, self.dtype),
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=self.pipe._prepare_text_ids(embeds).to(self.device),
            img_ids=torch.cat(part_ids, dim=1).to(self.device),
            return_dict=False,
        )[0]
        pred = out[:, : tokens.shape[1]]
        h, w = noisy.shape[2:]
        return pred.permute(0, 2, 1).reshape(b, -1, h, w)

    def default_shift(self, latents: torch.Tensor) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        seq_len = latents.shape[2] * latents.shape[3]
        return math.exp(compute_empirical_mu(image_seq_len=seq_len, num_steps=50))

    def layout_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        # Klein's latents are the VAE's channels patchified 2x2 into 4x as many: patchify the
        # weights with the pipeline's own function, so channel k of a cell weighs the pixel
        # cell it came from
        channels = self.pipe.vae.config.latent_channels
        return self.pipe._patchify_latents(pooled.expand(-1, channels, -1, -1).contiguous())

    @property
    def latent_cell(self) -> int:
        return 2 * self.pipe.vae_scale_factor  # the VAE's grid, patchified 2x2

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        z = latents * std.to(latents) + mean.to(latents)  # undo _encode_vae_image's norm
        z = self.pipe._unpatchify_latents(z)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0].float()


def linear_shift_mu(seq_len: int, config: dict) -> float:
    """Qwen-Image's resolution-dependent mu (its scheduler config's base/max shift)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + (base - slope * base_len)


def shift_from_mu(mu: float) -> float:
    return math.exp(mu)


def _grad(enabled: bool):
    return torch.enable_grad() if enabled else torch.no_grad()


def _pad_text(text: list[torch.Tensor], device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack variable-length prompt embeddings, zero-padded, with the attention mask."""
    longest = max(t.shape[0] for t in text)
    embeds = torch.zeros(len(text), longest, text[0].shape[1], device=device, dtype=dtype)
    mask = torch.zeros(len(text), longest, device=device, dtype=torch.long)
    for i, t in enumerate(text):
        embeds[i, : t.shape[0]] = t.to(device, dtype)
        mask[i, : t.shape[0]] = 1
    return embeds, (None if bool(mask.all()) else mask)


def load_quantized_pipeline(
    family: str,
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    quantize: str,
    transformer_device: torch.device | None = None,
):
    """The family's pipeline from a local folder on `device`, its transformer stored as
    model.quantize says (nf4/int8: bitsandbytes, CUDA only; fp8: facelora.models.fp8) and
    placed on `transformer_device` (default: `device`; FSDP shards it from the CPU)."""
    transformer_device = transformer_device or device
    import diffusers

    record = get_family(family)
    extra = {}
    bitsandbytes = quantize in ("nf4", "int8")
    if bitsandbytes:
        if not torch.cuda.is_available():
            raise ModelRefused(
                f"model.quantize = {quantize} needs a CUDA GPU (bitsandbytes quantizes on the "
                f"GPU); set model.quantize: none or fp8 on this machine"
            )
        if quantize == "nf4":
            config = diffusers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        else:
            config = diffusers.BitsAndBytesConfig(load_in_8bit=True)
        extra["transformer"] = getattr(diffusers, record.transformer_class).from_pretrained(
            path,
            subfolder="transformer",
            quantization_config=config,
            dtype=dtype,
            local_files_only=True,
        )
    cls = getattr(diffusers, record.pipeline_class)
    pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    if quantize == "fp8":
        from facelora.models.fp8 import store_blocks_in_fp8

        store_blocks_in_fp8(pipe.transformer, transformer_device, dtype)
    for name, module in pipe.components.items():
        if name == "transformer":
            if not bitsandbytes:  # bitsandbytes placed its transformer already
                module.to(transformer_device)
        elif isinstance(module, torch.nn.Module):
            module.to(device)
    return pipe


def load_adapter(
    family: str,
    path: str | Path,
    dtype: str,
    device: torch.device,
    quantize: str = "none",
    transformer_device: torch.device | None = None,
) -> FamilyAdapter:
    return ADAPTERS[get_family(family).name](path, dtype, device, quantize, transformer_device)


def bucket_size(width: int, height: int, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """About resolution^2 pixels with the image's aspect ratio, sides a multiple of 16."""
    aspect = width / height
    w = max(multiple, round((resolution * aspect**0.5) / multiple) * multiple)
    h = max(multiple, round((resolution / aspect**0.5) / multiple) * multiple)
    return w, h


def to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL image resized to (width, height) as a (1, 3, H, W) tensor in [-1, 1]."""
    rgb = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1).unsqueeze(0)
