"""The schema of params.yaml: every setting of the workflow, validated in one place.

Snakemake (rules/common.smk) and every `facelora` command load params.yaml through
`load_params`, so a bad value fails the same way everywhere: one line per bad key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from facelora.errors import SettingsError
from facelora.registry.families import FAMILY_NAMES
from facelora.registry.families import family as get_family
from facelora.registry.scores import SCORE_NAMES, VLM_PREFIX, EvalMetric

DEFAULT_PARAMS_FILE = Path("params.yaml")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


VLM_SCORE = re.compile(rf"^{VLM_PREFIX}[a-z][a-z0-9_]*$")


def _score_name(name: str) -> str:
    if name in SCORE_NAMES or VLM_SCORE.fullmatch(name):
        return name
    raise ValueError(
        f"unknown pair score {name!r}: one of {', '.join(SCORE_NAMES)}, or vlm_<name> for a "
        f"name in synthesis.scorer.rubric"
    )


ScoreName = Annotated[str, AfterValidator(_score_name)]


class ParamsError(SettingsError):
    """params.yaml is missing, unreadable or has bad values; the message names each key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- images -------------------------------------------------------------------------------


class ImagesParams(Section):
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".webp"]
    max_pixels: PositiveInt = 100_000_000  # refuse larger images before decoding (bombs)
    max_file_mb: PositiveInt = 200
    alpha_background: tuple[int, int, int] = (255, 255, 255)

    @field_validator("extensions")
    @classmethod
    def _dotted_lowercase(cls, value: list[str]) -> list[str]:
        out = [e.lower() if e.startswith(".") else "." + e.lower() for e in value]
        if not out:
            raise ValueError("list at least one extension, e.g. [.jpg, .png]")
        return out

    @field_validator("alpha_background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("each channel must be within 0..255")
        return value


# --- faces --------------------------------------------------------------------------------


class DlibParams(Section):
    detector: Literal["hog", "cnn"] = "hog"
    upsample: Annotated[int, Field(ge=0, le=2)] = 0
    min_score: float = 0.25  # HOG: SVM margin (false positives score ~0.1); CNN: confidence
    cnn_model: str | None = None  # default: face_recognition_models' mmod_human_face_detector
    landmarks_model: str | None = None  # default: the 68-point predictor
    embedder_model: str | None = None  # default: dlib_face_recognition_resnet_model_v1
    # torch: the same network and weights run by PyTorch in batches (matches dlib to 1e-6,
    # about 8x faster); dlib: dlib's own implementation
    embedder_runtime: Literal["torch", "dlib"] = "torch"


class InsightfaceParams(Section):
    root: str = "~/.insightface"
    pack: str = "buffalo_l"  # a folder under ROOT/models holding det_*.onnx + the ArcFace model
    det_size: PositiveInt = 640
    min_score: Fraction = 0.5


class UltralyticsParams(Section):
    weights: str | None = None  # a YOLO face-detection .pt file (e.g. yolov8n-face.pt)
    min_score: Fraction = 0.4
    embedder: Literal["dlib", "insightface"] = "dlib"


# Cosine similarity above which two faces count as one person, per embedder (measured on
# ../shared/faces for dlib: same person >= 0.93, different people <= 0.91).
SAME_PERSON_SIMILARITY = {"dlib": 0.92, "insightface": 0.40}


class FacesParams(Section):
    backend: Literal["dlib", "insightface", "ultralytics"] = "dlib"
    # None: the embedder's default (SAME_PERSON_SIMILARITY); used by identity pairing and split
    same_person_similarity: Fraction | None = None
    max_side: PositiveInt = 1024  # detect on a copy at most this large; boxes map back
    min_face_px: PositiveInt = 40  # smaller faces (full-resolution box side) are dropped
    max_faces: PositiveInt = 10  # more faces than this: the image is rejected (crowds)
    dlib: DlibParams = DlibParams()
    insightface: InsightfaceParams = InsightfaceParams()
    ultralytics: UltralyticsParams = UltralyticsParams()

    @property
    def embedder(self) -> str:
        return self.ultralytics.embedder if self.backend == "ultralytics" else self.backend

    @property
    def same_person(self) -> float:
        if self.same_person_similarity is not None:
            return self.same_person_similarity
        return SAME_PERSON_SIMILARITY[self.embedder]


# --- crop ---------------------------------------------------------------------------------


class CropParams(Section):
    padding: Annotated[float, Field(ge=0.0, le=3.0)] = 0.45  # face swap 0.4-0.5, head 0.8-1.0
    vertical_shift: Annotated[float, Field(ge=-1.0, le=1.0)] = -0.1  # of face side; <0 = up
    align: bool = True  # rotate so the eyes are horizontal
    min_side: PositiveInt = 512  # crop side in source pixels; smaller faces are rejected
    output_side: PositiveInt = 1024
    allow_upscale: bool = False  # False: a crop smaller than output_side keeps its size
    size_multiple: PositiveInt = 64  # output sides are rounded down to this
    png_compression: Annotated[int, Field(ge=0, le=9)] = 1

    @model_validator(mode="after")
    def _sizes(self) -> CropParams:
        if self.output_side % self.size_multiple:
            raise ValueError(
                f"crop.output_side ({self.output_side}) must be a multiple of "
                f"crop.size_multiple ({self.size_multiple})"
            )
        if self.min_side < self.size_multiple:
            raise ValueError("crop.min_side must be at least crop.size_multiple")
        return self


# --- pairs --------------------------------------------------------------------------------


class PairSource(Section):
    layout: Literal["auto", "kontext", "folders", "manifest"] = "auto"
    path: str = "."  # relative to paths.raw; a manifest file for layout=manifest
    target: str = "target"  # folders layout: the folder of edited ("end") images
    controls: list[str] = ["control"]  # folders layout: start folder, then reference folders


class AutoIdentityParams(Section):
    enabled: bool = False
    near_duplicate: Fraction = 0.995  # above this similarity two photos count as one photo
    max_references: Annotated[int, Field(ge=0, le=3)] = 1  # references besides the start
    max_pairs_per_identity: PositiveInt = 50
    change: str = "keep the same person, new photo"


class ScoreRange(Section):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ScoreRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class PairsParams(Section):
    sources: list[PairSource] = [PairSource()]
    multi_face: Literal["most_changed", "largest", "all"] = "most_changed"
    require_end_face: bool = True
    auto_identity: AutoIdentityParams = AutoIdentityParams()
    analysis_side: PositiveInt = 256  # scores are computed on crops resized to this side
    bg_mask_dilation: Annotated[float, Field(ge=0.0, le=2.0)] = 0.25
    # every pair must pass these to be usable at all (phases narrow further); e.g. for
    # expression edits: {identity_sim: {min: 0.92}}. Face swaps change identity on purpose.
    require: dict[ScoreName, ScoreRange] = {}
    # weights of the composite `quality` score (hair and skin tone matter most)
    quality_weights: dict[ScoreName, Annotated[float, Field(ge=0.0)]] = {
        "identity_sim": 1.0,
        "skin_delta_e": 2.0,
        "hair_sim": 2.0,
        "pose_diff": 0.5,
        "bg_ssim": 1.0,
    }

    @field_validator("quality_weights")
    @classmethod
    def _no_self_reference(cls, value: dict[str, float]) -> dict[str, float]:
        if "quality" in value:
            raise ValueError("quality cannot weigh itself")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one weight must be positive")
        return value


# --- synthesis ----------------------------------------------------------------------------

SYNTHESIS_KINDS = ("restoration", "swap", "edit")
DEGRADATIONS = ("blur", "motion_blur", "downscale", "noise", "jpeg", "webp", "color_fade")
RUBRIC_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RestorationParams(Section):
    """Seeded degradations of a face crop: start = degraded, end = the crop."""

    degradations: list[Literal[DEGRADATIONS]] = list(DEGRADATIONS)  # drawn from, per pair
    per_pair: Annotated[int, Field(ge=1, le=len(DEGRADATIONS))] = 2  # chained in one pair
    second_order: bool = False  # a second, milder chain after the first (Real-ESRGAN style)
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6  # 1: the heaviest of each filter
    caption: str = "restore the {damage} photo"  # {damage}: e.g. "blurry, compressed"

    @model_validator(mode="after")
    def _enough_filters(self) -> RestorationParams:
        listed = len(set(self.degradations))
        if self.per_pair > listed:
            raise ValueError(
                f"per_pair is {self.per_pair} but {listed} degradation(s) are listed: lower "
                f"per_pair or list more"
            )
        return self


class SwapParams(Section):
    """Self-supervised swap: end = photo k, start = photo k with the face region replaced,
    references = other photos of the same person."""

    region: Literal["face", "head"] = "face"  # head: the hair and ears too
    # what replaces the region in the start: gray (the inpainting convention; leaks nothing),
    # noise (leaks only colour statistics), blur (leaks the identity: the model may learn to
    # sharpen instead of taking the reference's face)
    fill: Literal["gray", "noise", "blur"] = "gray"
    feather: Annotated[float, Field(ge=0.0, le=0.5)] = 0.08  # mask edge, in face sizes
    max_references: Annotated[int, Field(ge=1, le=3)] = 1
    caption: str = "put the face of the reference person into the photo"


class InstructionGrid(Section):
    """Instructions as categories x intensities: each category's text has {intensity}."""

    categories: dict[str, str]  # e.g. {smile: "make the person smile {intensity}"}
    intensities: dict[str, str] = {"": ""}  # e.g. {slight: "slightly", strong: "broadly"}

    @model_validator(mode="after")
    def _placeholder(self) -> InstructionGrid:
        if not self.categories:
            raise ValueError("list at least one category")
        several = len(self.intensities) > 1
        for name, text in self.categories.items():
            if several and "{intensity}" not in text:
                raise ValueError(f"categories.{name}: the text must contain {{intensity}}")
        return self

    def expand(self) -> list[tuple[str, str]]:
        """(label, instruction) for every category x intensity, in the order given."""
        out = []
        for name, text in self.categories.items():
            for level, words in self.intensities.items():
                label = f"{name}:{level}" if level else name
                out.append((label, " ".join(text.replace("{intensity}", words).split())))
        return out


class ApiParams(Section):
    """The settings every model backend shares (local folders or HTTP endpoints)."""

    model: str | None = None  # a local folder (diffusers, transformers) or the API's model id
    base_url: str | None = None  # openai: any compatible server, e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # the NAME of the environment variable holding the key
    concurrency: PositiveInt = 4  # requests in flight at once
    max_requests: PositiveInt | None = None  # a budget per run; null: no limit
    timeout_s: Annotated[float, Field(gt=0.0)] = 120.0
    retries: Annotated[int, Field(ge=0)] = 4  # on 429, 5xx, timeouts and invalid answers

    @field_validator("api_key_env")
    @classmethod
    def _a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                "give the name of an environment variable (e.g. OPENAI_API_KEY), never the key"
            )
        return value


class GeneratorParams(ApiParams):
    """The edit kind's image generator."""

    backend: Literal["diffusers", "openai", "gemini"] = "diffusers"
    size: PositiveInt = 1024  # output side in pixels (openai: sent as SIDExSIDE)
    steps: PositiveInt = 28  # diffusers: sampling steps
    guidance: float | None = 4.0  # diffusers: null for no classifier-free guidance
    batch_size: PositiveInt = 1  # diffusers: photos per pipeline call


class RubricItem(Section):
    min: float = 1.0
    max: float = 5.0
    question: str  # what the model rates, e.g. "Was the instruction carried out?"

    @model_validator(mode="after")
    def _ordered(self) -> RubricItem:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


def _default_rubric() -> dict[str, RubricItem]:
    return {
        "instruction_success": RubricItem(
            question="How completely was the instruction carried out in the after image?"
        ),
        "identity_kept": RubricItem(question="Is the after image clearly the same person?"),
        "artifacts": RubricItem(
            question="How free of artifacts (warping, smearing, extra features) is the after "
            "image? 5: none"
        ),
        "intensity": RubricItem(min=0.0, max=1.0, question="How strong is the change?"),
    }


class ScorerParams(ApiParams):
    """A vision-language model that rates each (before, after) against the rubric."""

    backend: Literal["none", "transformers", "openai"] = "none"  # none: no VLM scores
    rubric: dict[str, RubricItem] = Field(default_factory=_default_rubric)
    describe: bool = True  # also ask for a one-line description of the change
    caption_from_description: bool = False  # use that description as the pair's change
    other_pairs: bool = False  # also score pairs from the raw layouts (not only synthesized)
    max_new_tokens: PositiveInt = 256  # transformers
    device: str = "cpu"  # transformers

    @field_validator("rubric")
    @classmethod
    def _names(cls, value: dict[str, RubricItem]) -> dict[str, RubricItem]:
        bad = [k for k in value if not RUBRIC_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"rubric names must be lower_snake_case: {', '.join(bad)}")
        return value


class SynthesisParams(Section):
    kinds: list[Literal[SYNTHESIS_KINDS]] = []  # any of restoration, swap, edit
    variations: PositiveInt = 1  # pairs made per photo and kind (edit: per instruction)
    seed: int | None = None  # null: the top-level seed
    restoration: RestorationParams = RestorationParams()
    swap: SwapParams = SwapParams()
    # the edit kind: a list of instructions, or categories x intensities
    instructions: list[str] | InstructionGrid = []
    generator: GeneratorParams = GeneratorParams()
    scorer: ScorerParams = ScorerParams()

    @field_validator("kinds")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each kind once")
        return value

    @model_validator(mode="after")
    def _edit_needs(self) -> SynthesisParams:
        if "edit" in self.kinds and not self.instruction_list():
            raise ValueError(
                "synthesis.instructions: the edit kind needs instructions (a list, or "
                "categories with intensities)"
            )
        if "edit" in self.kinds and not self.generator.model:
            raise ValueError(
                "synthesis.generator.model: the edit kind needs a generator model (a local "
                "pipeline folder for diffusers, the model id for openai and gemini)"
            )
        return self

    def instruction_list(self) -> list[tuple[str, str]]:
        """(label, instruction) pairs of the edit kind."""
        if isinstance(self.instructions, InstructionGrid):
            return self.instructions.expand()
        return [(f"i{k + 1}", text) for k, text in enumerate(self.instructions)]


# --- captions -----------------------------------------------------------------------------


class VlmParams(Section):
    enabled: bool = False
    model_path: str | None = None  # a local image-text-to-text model folder (e.g. Qwen2.5-VL)
    prompt: str = (
        "The first image is before an edit, the second after. Describe the edit as one short "
        "imperative instruction, e.g. 'open the eyes wider'. Answer with the instruction only."
    )
    max_new_tokens: PositiveInt = 32
    device: str = "cpu"

    @model_validator(mode="after")
    def _needs_path(self) -> VlmParams:
        if self.enabled and not self.model_path:
            raise ValueError("captions.vlm.model_path must be set when captions.vlm.enabled")
        return self


class CaptionsParams(Section):
    trigger: str = "EDITFACE"
    template: str = "{trigger} {change}"
    default_change: str | None = None  # used when a pair has no caption; None: reject
    add_trigger: bool = True  # prepend the trigger when a caption lacks it
    class_words: list[str] = ["sks", "ohwx", "a photo of", "a picture of", "an image of"]
    max_words: PositiveInt = 60
    reject_on_lint: bool = False  # False: violations are reported, the pair stays
    vlm: VlmParams = VlmParams()

    @field_validator("trigger")
    @classmethod
    def _one_token(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("the trigger must be one word without spaces, e.g. EDITFACE")
        return value

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        if "{change}" not in value:
            raise ValueError("the template must contain {change}")
        return value


# --- split and phases ---------------------------------------------------------------------


class SplitParams(Section):
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    min_validation: Annotated[int, Field(ge=0)] = 1
    group_by: Literal["identity", "image", "none"] = "identity"


class TopSelection(Section):
    by: ScoreName = "quality"
    order: Literal["best", "ascending", "descending"] = "best"
    k: PositiveInt | None = None
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = None

    @model_validator(mode="after")
    def _one_size(self) -> TopSelection:
        if (self.k is None) == (self.fraction is None):
            raise ValueError("give exactly one of k (a count) or fraction (0-1]")
        return self


class PhaseParams(Section):
    name: str
    steps: PositiveInt
    init_from: str = "none"  # none | best | last (of the previous phase) | a .safetensors path
    # the run this phase comes after: `base` (the model alone) for the first, else the previous
    # phase's name; dvc.yaml's per-phase stages depend on it (null: filled in from the order)
    after: str | None = None
    gpus: Annotated[int, Field(ge=0)] | None = None  # per node; null: resources.train.gpus
    filters: dict[ScoreName, ScoreRange] = {}
    top: TopSelection | None = None
    min_pairs: PositiveInt = 1

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG.match(value):
            raise ValueError("use lowercase letters, digits, '_' or '-' (it names a folder)")
        return value

    @field_validator("init_from")
    @classmethod
    def _init(cls, value: str) -> str:
        if value not in ("none", "best", "last") and not value.endswith(".safetensors"):
            raise ValueError("use none, best, last or a path to a .safetensors LoRA")
        return value


def _default_phases() -> list[PhaseParams]:
    return [
        PhaseParams(name="broad", steps=2000, init_from="none"),
        PhaseParams(
            name="skin_match",
            steps=4000,
            init_from="best",
            filters={"skin_delta_e": ScoreRange(max=8.0)},
            top=TopSelection(by="skin_delta_e", fraction=0.5),
        ),
        PhaseParams(
            name="best_quality",
            steps=1000,
            init_from="best",
            top=TopSelection(by="quality", fraction=0.25),
        ),
    ]


# --- model, LoRA and training -------------------------------------------------------------


class ModelParams(Section):
    family: Literal[FAMILY_NAMES] = "qwen_image_edit"  # facelora.registry.families
    # a local diffusers folder (never downloaded); the default is the tiny random model that
    # `facelora make-tiny-model` builds for the demo and the tests
    path: str = "results/models/tiny-qwen_image_edit"
    dtype: Literal["bfloat16", "float16", "float32"] = "float32"  # bfloat16 on GPUs
    device: str = "auto"  # auto: cuda when available, else cpu
    # the frozen transformer's block weights in less memory (the LoRA stays fp32): nf4 | int8
    # with bitsandbytes (CUDA only); fp8: float8 storage, computed in `dtype` (any device)
    quantize: Literal["none", "nf4", "int8", "fp8"] = "none"


class LoraParams(Section):
    # None: the family's recipe (facelora.registry.families). qwen_image_edit: full | attention |
    # image_stream; flux2_klein: all_blocks | double_stream | single_stream | blocks;
    # or a list of module names
    preset: str | list[str] | None = None
    blocks: list[int] | None = None  # flux2_klein preset `blocks`: the block indices
    rank: PositiveInt | None = None
    alpha: float | None = None
    dropout: Fraction = 0.0
    train_text_encoder: bool = False

    def for_family(self, family: str) -> LoraParams:
        """These settings with every None replaced by the family's recipe value."""
        recipe = get_family(family).recipe
        rank = self.rank if self.rank is not None else recipe.rank
        return self.model_copy(
            update={
                "preset": self.preset if self.preset is not None else recipe.preset,
                "rank": rank,
                "alpha": self.alpha if self.alpha is not None else recipe.alpha_per_rank * rank,
            }
        )

    @property
    def scale_alpha(self) -> float:
        if self.alpha is None or self.rank is None:
            raise ValueError("call for_family() first: rank/alpha follow the model family")
        return self.alpha


class RegularizationParams(Section):
    folder: str | None = None  # photos to keep unchanged (start = end), mixed into training
    ratio: PositiveInt = 6  # training batches per regularization batch (recipe 6:1)
    caption: str = "EDITFACE keep the photo unchanged"


class RegionWeights(Section):
    """Per-pixel loss weights of the end image's regions (from its 5 landmarks)."""

    face: Annotated[float, Field(ge=0.0)] = 1.0  # forehead to chin, cheek to cheek
    hair: Annotated[float, Field(ge=0.0)] = 1.0  # the band of the head around the face
    background: Annotated[float, Field(ge=0.0)] = 1.0  # everything else
    feather: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1  # soft region edges, in face sizes

    @property
    def uniform(self) -> bool:
        """Every region weighs the same: the loss is the plain mean (today's loss exactly)."""
        return self.face == self.hair == self.background

    @model_validator(mode="after")
    def _some_weight(self) -> RegionWeights:
        if self.face == self.hair == self.background == 0.0:
            raise ValueError(
                "train.losses.regions: face, hair and background are all 0, so nothing would "
                "be learned: give at least one region a weight above 0"
            )
        return self


class IdentityLoss(Section):
    """1 - cos(f(D(x0)), f(D(x0_pred))): the face embedder f on the decoded target and on the
    decoded one-step prediction, both aligned with the target's landmarks (docs/losses.md)."""

    weight: Annotated[float, Field(ge=0.0)] = 0.0  # off; the recipe and PixelSmile: 0.1
    backend: Literal["dlib", "arcface"] = "dlib"  # dlib: ships with its weights
    # arcface: insightface's recognition ONNX (w600k_r50.onnx, glintr100.onnx) or its pack folder
    arcface_model: str | None = None
    # only at noise levels up to this (PixelSmile: t <= 600 of 1000): a prediction from
    # almost pure noise has no face to compare
    max_sigma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    window: Literal["face", "image"] = "face"  # decode only the latents around the face


class LpipsLoss(Section):
    """LPIPS between the decoded prediction and the decoded target."""

    weight: Annotated[float, Field(ge=0.0)] = 0.0  # off; the recipe: "varies"
    # vgg: the lpips authors' choice for a loss (alex, eval's default, for a metric)
    net: Literal["alex", "vgg", "squeeze"] = "vgg"
    backbone: str | None = None  # torchvision weights file; None: the torch hub cache's
    max_sigma: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


class ContrastiveLoss(Section):
    """Symmetric InfoNCE between two edits of one start image (PixelSmile): each decoded
    prediction is pulled to its own target's CLIP features and pushed from the other's."""

    weight: Annotated[float, Field(ge=0.0)] = 0.0  # off; the recipe 0.05, PixelSmile's config 1.0
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    clip_model: str | None = None  # a local CLIP folder (e.g. the one eval.clip_model names)
    max_sigma: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


class LossesParams(Section):
    regions: RegionWeights = RegionWeights()  # the flow-matching loss's per-pixel weights
    identity: IdentityLoss = IdentityLoss()
    lpips: LpipsLoss = LpipsLoss()
    contrastive: ContrastiveLoss = ContrastiveLoss()

    @property
    def decoded_terms(self) -> list[str]:
        """The terms switched on that compare decoded images, in the order they are logged."""
        return [n for n in ("identity", "lpips", "contrastive") if getattr(self, n).weight > 0]


class TrainParams(Section):
    resolution: PositiveInt = 1024  # target area side: images train at about this many pixels
    batch_size: PositiveInt = 1
    grad_accum: PositiveInt = 1
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    weight_decay: float | None = None  # None: 1e-5 (adamw), 0.05 (prodigy)
    schedule: Literal["constant", "cosine", "polynomial"] = "constant"
    warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    lr_end: float = 1e-4  # polynomial: the final learning rate
    timestep_sampling: Literal["sigmoid", "shift", "uniform"] = "sigmoid"
    sigmoid_scale: float = 1.0  # logit-normal: sigma = sigmoid(scale * N(0, 1))
    shift: float | None = None  # shift sampling; None: the model's own (resolution dependent)
    noise_offset: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # recipe: 0.05-0.1
    min_snr_gamma: float | None = None  # refused: not defined for flow matching
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None  # e.g. 0.999
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # with several processes: ddp (each holds the whole model) | fsdp (the model sharded
    # over them: 1/N of the frozen weights each; adamw only, model.quantize none or fp8)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    save_every: PositiveInt = 250
    # the newest checkpoints that keep the full training state (state.pt, for resuming:
    # optimizer moments make it ~3x the LoRA); older ones keep their LoRA weights only.
    # null: every checkpoint keeps it
    keep_states: PositiveInt | None = 1
    cache: bool = True  # VAE latents and text embeddings on disk, reused across phases
    diptych: bool = False  # train on [before | after] side by side, no control image
    diptych_prefix: str = "a diptych, the same person before (left) and after (right) the edit:"
    regularization: RegularizationParams = RegularizationParams()
    losses: LossesParams = LossesParams()

    @model_validator(mode="after")
    def _fsdp_optimizer(self) -> TrainParams:
        if self.distributed == "fsdp" and self.optimizer != "adamw":
            raise ValueError(
                f"train.distributed: fsdp shards the LoRA's optimizer state, which "
                f"{self.optimizer} does not support: use optimizer: adamw, or distributed: ddp"
            )
        return self

    @field_validator("min_snr_gamma")
    @classmethod
    def _no_min_snr(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError(
                "min-SNR weighting is defined for epsilon/v-prediction diffusion; flow matching "
                "(both supported models) has no SNR schedule to weight by: remove it"
            )
        return value


# --- evaluation, choice, final LoRA -------------------------------------------------------


class EvalParams(Section):
    resolution: PositiveInt = 1024  # generated images: about this many pixels squared
    steps: PositiveInt = 28  # sampling steps
    guidance: float | None = 4.0  # None: no classifier-free guidance
    lora_scale: Annotated[float, Field(ge=0.0)] = 1.0  # the strength when lora_scales is None
    # every strength to score each checkpoint at (one LoRA load, re-weighted); None: [lora_scale]
    lora_scales: list[Annotated[float, Field(ge=0.0)]] | None = None
    seed: int | None = None  # None: the top-level seed
    use_ema: bool = False  # judge (and ship) the EMA weights instead of the raw ones
    checkpoints_per_job: PositiveInt = 1  # a job loads the model once and swaps LoRAs
    identity_backend: Literal["auto", "insightface", "dlib"] = "auto"  # auto: ArcFace if present
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_backbone: str | None = None  # None: torchvision's weights in the torch hub cache
    clip_model: str | None = None  # a local CLIP folder; None: CLIP score unavailable
    bg_mask_dilation: Annotated[float, Field(ge=0.0, le=2.0)] = 0.25
    analysis_size: Annotated[int, Field(ge=64)] = 512  # LPIPS and SSIM: the longer side

    @model_validator(mode="after")
    def _scales_agree(self) -> EvalParams:
        given = self.lora_scales
        if given is None:
            return self
        if not given:
            raise ValueError("eval.lora_scales: list at least one strength, or null: [lora_scale]")
        if len(set(given)) != len(given):
            raise ValueError(f"eval.lora_scales {given}: a strength is listed twice")
        # lora_scale stays the reference strength: its rows must be what single-scale
        # evaluation gives, so a list that leaves it out contradicts it
        if self.lora_scale not in given:
            raise ValueError(
                f"eval.lora_scale {self.lora_scale} is not in eval.lora_scales {given}: add it "
                "to the list, set lora_scale to one of them, or set lora_scales: null"
            )
        return self

    @property
    def scales(self) -> list[float]:
        """The strengths every checkpoint is scored at, ascending."""
        return sorted(self.lora_scales) if self.lora_scales is not None else [self.lora_scale]


class ObjectiveParams(Section):
    """How the best checkpoint of a phase is chosen from per-checkpoint mean metrics."""

    constraints: dict[EvalMetric, ScoreRange] = {"identity_sim": ScoreRange(min=0.85)}
    # a weighted sum of metric means (negative weight: lower is better); missing ones skipped
    weights: dict[EvalMetric, float] = {
        "identity_sim": 1.0,
        "lpips": -1.0,
        "bg_ssim": 0.5,
        "clip_score": 0.01,
    }


class FinalParams(Section):
    merge_rank: PositiveInt | None = None  # compress the final LoRA by SVD to this rank
    fuse: bool = False  # also write the transformer with the LoRA fused in (large)


class ApplyParams(Section):
    """`facelora apply` (and the `apply` rule): its flags override these."""

    photos: str = "data/apply"  # the rule's photos (a folder); the command's default PHOTOS
    prompt: str = ""  # the edit, e.g. "EDITFACE add glasses"; empty: --prompt is required
    faces: str = "all"  # all | largest | an index (0: the largest face)
    seed: int | None = None  # None: the top-level seed
    format: Literal["png", "same"] = "png"  # same: each photo in its input's format
    # JPEG inputs with format same: lossless writes PNG (exact outside the faces), reencode
    # writes JPEG at jpeg_quality (within re-encoding error)
    jpeg: Literal["lossless", "reencode"] = "lossless"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    skip_unedited: bool = False  # write nothing for photos left unedited

    @field_validator("faces")
    @classmethod
    def _faces(cls, value: str) -> str:
        if value in ("all", "largest") or value.isdigit():
            return value
        raise ValueError("give all, largest or a face index (0 = the largest)")


# --- top level ----------------------------------------------------------------------------


class JobResources(Section):
    gpus: Annotated[int, Field(ge=0)] = 0  # per node
    cpus: PositiveInt = 1
    mem_mb: PositiveInt = 2000  # per node
    runtime: PositiveInt = 60  # minutes
    nodes: PositiveInt = 1  # training only: several nodes, one accelerate launcher on each


class ResourcesParams(Section):
    """What each job asks the scheduler for (snakemake --profile slurm; local runs ignore gpus)."""

    data: JobResources = JobResources(mem_mb=2000, runtime=120)
    train: JobResources = JobResources(gpus=1, cpus=8, mem_mb=64000, runtime=720)
    eval: JobResources = JobResources(gpus=1, cpus=4, mem_mb=32000, runtime=120)
    # the edit kind's jobs with a local generator (synthesis.generator.backend: diffusers)
    synthesis: JobResources = JobResources(gpus=1, cpus=4, mem_mb=48000, runtime=240)
    # a failed job is retried (the profile's `retries`) asking for this much more memory and
    # time each attempt: attempt n gets mem_mb * growth^(n-1)
    retry_growth: Annotated[float, Field(ge=1.0)] = 1.5

    @model_validator(mode="after")
    def _nodes_for_training_only(self) -> ResourcesParams:
        for name in ("data", "eval", "synthesis"):
            if getattr(self, name).nodes != 1:
                raise ValueError(f"resources.{name}.nodes: only training spans several nodes")
        return self


class ClusterParams(Section):
    """Where Slurm jobs go (snakemake --profile slurm); null: the cluster's default."""

    partition: str | None = None  # CPU jobs (the data steps, reports)
    gpu_partition: str | None = None  # train and evaluate jobs; null: `partition`
    account: str | None = None
    qos: str | None = None


class PathsParams(Section):
    raw: str = "data/raw"
    results: str = "results"


class WorkflowParams(Section):
    shards: PositiveInt = 2  # data steps are split into this many jobs (scatter/gather)
    workers: PositiveInt = 1  # processes inside one job
    # the Snakemake profile `dvc repro` runs the stages with: profiles/local (this machine)
    # or slurm (every job submitted to Slurm)
    profile: str = "profiles/local"


class Params(Section):
    seed: int = 42
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4  # learning rate (training)
    paths: PathsParams = PathsParams()
    workflow: WorkflowParams = WorkflowParams()
    images: ImagesParams = ImagesParams()
    faces: FacesParams = FacesParams()
    crop: CropParams = CropParams()
    synthesis: SynthesisParams = SynthesisParams()
    pairs: PairsParams = PairsParams()
    captions: CaptionsParams = CaptionsParams()
    split: SplitParams = SplitParams()
    phases: list[PhaseParams] = Field(default_factory=_default_phases)
    model: ModelParams = ModelParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    resources: ResourcesParams = ResourcesParams()
    cluster: ClusterParams = ClusterParams()
    eval: EvalParams = EvalParams()
    objective: ObjectiveParams = ObjectiveParams()
    final: FinalParams = FinalParams()
    apply: ApplyParams = ApplyParams()

    @model_validator(mode="after")
    def _vlm_scores_exist(self) -> Params:
        used = {f"pairs.require.{n}": n for n in self.pairs.require}
        used |= {f"pairs.quality_weights.{n}": n for n in self.pairs.quality_weights}
        for i, phase in enumerate(self.phases):
            used |= {f"phases[{i}].filters.{n}": n for n in phase.filters}
            if phase.top is not None:
                used[f"phases[{i}].top.by"] = phase.top.by
        scorer = self.synthesis.scorer
        for where, name in used.items():
            if not name.startswith(VLM_PREFIX):
                continue
            if scorer.backend == "none":
                raise ValueError(f"{where}: {name} needs a VLM: set synthesis.scorer.backend")
            if name.removeprefix(VLM_PREFIX) not in scorer.rubric:
                raise ValueError(
                    f"{where}: {name} is not in synthesis.scorer.rubric "
                    f"({', '.join(scorer.rubric)})"
                )
        return self

    @model_validator(mode="after")
    def _lora_for_family(self) -> Params:
        self.lora = self.lora.for_family(self.model.family)
        return self

    @model_validator(mode="after")
    def _fsdp_quantize(self) -> Params:
        if self.train.distributed == "fsdp" and self.model.quantize in ("nf4", "int8"):
            raise ValueError(
                f"train.distributed: fsdp cannot shard bitsandbytes' {self.model.quantize} "
                f"weights: use model.quantize: fp8 (or none), or distributed: ddp"
            )
        if self.train.distributed == "fsdp" and self.lora.train_text_encoder:
            raise ValueError(
                "train.distributed: fsdp shards the transformer only, and its gradients cannot "
                "be clipped together with an unsharded text encoder LoRA: set "
                "lora.train_text_encoder: false, or distributed: ddp"
            )
        return self

    @model_validator(mode="after")
    def _phase_chain(self) -> Params:
        if not self.phases:
            raise ValueError("phases: list at least one phase")
        names = [p.name for p in self.phases]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"phases: names must be unique, repeated: {', '.join(dupes)}")
        reserved = sorted({"base", "metrics", "chosen"} & set(names))
        if reserved:
            raise ValueError(
                f"phases: {', '.join(reserved)} is reserved (the model without a LoRA and "
                "keys of results/eval/summary.json); rename that phase"
            )
        if self.phases[0].init_from in ("best", "last"):
            raise ValueError(
                f"phases[0].init_from: the first phase has no previous phase to start from "
                f"({self.phases[0].init_from!r}); use none or a path to a .safetensors LoRA"
            )
        # phases run in order: each comes after the previous one (the first after `base`)
        for i, phase in enumerate(self.phases):
            expected = "base" if i == 0 else names[i - 1]
            if phase.after is None:
                phase.after = expected
            elif phase.after != expected:
                raise ValueError(
                    f"phases[{i}].after: {phase.after!r}, but phases run in the order listed: "
                    f"it must be {expected!r} (or leave it out)"
                )
        return self

    def train_gpus(self, phase: str) -> int:
        """GPUs per node for a phase's training job."""
        own = self.phase(phase).gpus
        return self.resources.train.gpus if own is None else own

    @property
    def phase_names(self) -> list[str]:
        return [p.name for p in self.phases]

    def eval_groups(self, name: str) -> list[list[int]]:
        """A phase's checkpoint steps in evaluation jobs of eval.checkpoints_per_job."""
        steps, n = self.checkpoint_steps(name), self.eval.checkpoints_per_job
        return [steps[i : i + n] for i in range(0, len(steps), n)]

    def checkpoint_steps(self, name: str) -> list[int]:
        """The steps at which a phase's training saves a checkpoint (save_every, and the end)."""
        total, every = self.phase(name).steps, self.train.save_every
        steps = list(range(every, total + 1, every))
        return steps if steps and steps[-1] == total else [*steps, total]

    def phase(self, name: str) -> PhaseParams:
        for p in self.phases:
            if p.name == name:
                return p
        raise ParamsError(f"no phase named {name!r} in params.yaml (phases: {self.phase_names})")


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} bad value(s):"]
    for e in error.errors():
        # model validators report at the model's loc; their message already names keys
        msg = e["msg"].removeprefix("Value error, ")
        shown = ""
        secret = any(str(part).endswith("api_key_env") for part in e["loc"])
        plain = e["type"] not in ("missing", "extra_forbidden") and not secret
        if plain and not isinstance(e.get("input"), dict):  # never echo what may be a key
            shown = f" (got {e.get('input')!r})"
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (a typo? see README, 'params.yaml')"
        key = _key(e["loc"])
        lines.append(f"  {key}: {msg}{shown}" if key else f"  {msg}{shown}")
    return "\n".join(lines)


def validate_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping. Numbers written as strings ('5e-05') become floats."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"{path}: not found. Run facelora from the project root (where params.yaml lives) "
            f"or pass --params PATH."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of settings")
    return validate_params(raw, source=str(path))
