"""MediRound configuration: one dataclass and its presets (`full` = the paper's model; `tiny` and `lite` = ours,
`lite` the shipped default).

Both presets build the same classes; only widths, depths and input sizes differ. The 256-d prompt and the
JCM MLP sizes ([256,512,512,1] and [256,512,512,256]) are the same at both sizes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

SPECIAL_TOKENS = {"seg": "[SEG]", "crop": "<crop>", "box": "<box>", "image": "<image>"}


@dataclass
class TextConfig:
    """The language model (a Mistral decoder, as in LLaVA-Med v1.5)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_word_embeddings: bool = False  # the lite preset ties them (its vocabulary is MiniLM's 30.5 k words)


@dataclass
class VisionConfig:
    """The LLaVA vision tower (CLIP ViT) and which of its layers feeds the projector."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    select_layer: int = -2

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TinyViTConfig:
    """LiteMedSAM's TinyViT image encoder (`model/tiny_vit.py`): widths and depths per stage; the defaults are
    LiteMedSAM's (5.7 M encoder parameters, 256² input, 64² embedding)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # the first stage is convolutional: its entry is unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # stride of the patch merge after stages 0, 1, 2
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3

    def __post_init__(self):
        for name in ("embed_dims", "depths", "num_heads", "window_sizes", "merge_strides"):
            setattr(self, name, tuple(getattr(self, name)))
        stages = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == stages
                and len(self.merge_strides) == stages - 1):
            raise ConfigError("tiny_vit: one entry per stage in embed_dims, depths, num_heads, window_sizes, and "
                              "one merge stride fewer")

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell (4 for LiteMedSAM: 256² → 64²)."""
        out = 1
        for s in self.merge_strides:
            out *= s
        return out


@dataclass
class SegmenterConfig:
    """The segmenter: an image encoder (MedSAM's SAM ViT, or LiteMedSAM's TinyViT), SAM's prompt encoder and
    mask decoder. The ViT fields describe `encoder="vit"` only; `encoder="tiny_vit"` reads `tiny_vit`, and its
    `patch_size` is the encoder's stride (input pixels per embedding cell)."""

    image_size: int
    patch_size: int
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    global_attn_indexes: tuple[int, ...] = ()
    window_size: int | None = None
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    encoder: str = "vit"  # "vit" (SAM/MedSAM) or "tiny_vit" (LiteMedSAM)
    tiny_vit: TinyViTConfig | None = None

    def __post_init__(self):
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        if isinstance(self.tiny_vit, dict):
            self.tiny_vit = _build(TinyViTConfig, self.tiny_vit, "segmenter: tiny_vit")
        if self.encoder == "vit":
            missing = [n for n in ("embed_dim", "depth", "num_heads", "window_size") if getattr(self, n) is None]
            if missing:
                raise ConfigError(f"segmenter: the ViT encoder needs {', '.join(missing)}")
        elif self.encoder == "tiny_vit":
            if self.tiny_vit is None:
                self.tiny_vit = TinyViTConfig()
            if self.patch_size != self.tiny_vit.stride:
                raise ConfigError(f"segmenter: patch_size {self.patch_size} must equal the TinyViT stride "
                                  f"{self.tiny_vit.stride}")
        else:
            raise ConfigError(f"segmenter.encoder must be 'vit' or 'tiny_vit', got {self.encoder!r}")

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class JCMConfig:
    """Judgment & Correction Mechanism: quality MLP [256,512,512,1], correction MLP [256,512,512,256]."""

    hidden_dim: int = 512
    beta: float = 0.6
    # False: the corrected prompt is correction(e), as in the public code (official checkpoints load this way).
    # True: e + correction(e) with a zero-initialised last layer, so an untrained correction is the identity
    # and training can only move prompts where that helps (our MediRound-Tiny).
    residual_correction: bool = False
    # True (an option of ours, not in the paper): the correction also sees its prompt's first decode, the image
    # embedding pooled under the unrefined mask and the decoder's mask token, through a zero-initialised
    # projection added to its input. The MLP keeps the paper's widths.
    correction_context: bool = False
    # True (ours, with correction_context): the context also holds what the first decode's mask token reads
    # from the whole image embedding, every location marked inside/outside the unrefined mask (jcm.MaskAttention).
    correction_attention: bool = False
    # True (ours): a corrected mask is also redrawn at the segmenter's full input resolution around itself, from
    # the slice and its logits (jcm.MaskRefiner, identity until trained); SAM's decoder draws at a quarter of it.
    correction_refiner: bool = False
    # Whether these JCM weights were trained for this model: False after stage 1 (a fresh or stale JCM: it is not
    # applied, `MediRound.jcm_usable`), True after stage 2; None where not recorded (checkpoints written before
    # this field, e.g. MediRound-Tiny as shipped: applied as trained).
    trained: bool | None = None


@dataclass
class MediRoundConfig:
    size: str
    text: TextConfig
    vision: VisionConfig
    segmenter: SegmenterConfig
    jcm: JCMConfig = field(default_factory=JCMConfig)
    # How the segmenter input is normalised: "minmax" ([0,1], as MedSAM) or "sam_mean_std" (public MediRound).
    segmenter_normalization: str = "minmax"
    # "llava_mistral": [INST] ... [/INST] (full size); "plain": USER:/ASSISTANT: (tiny tokenizer).
    chat_template: str = "plain"
    max_answer_tokens: int = 48
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # The CT windows (level, width) per body region the model was trained with; the engine shows a CT slice
    # through its region's (imaging.SliceImage.ct_window). The generator's windows (data/anatomy.py CT_WINDOWS).
    ct_windows: dict = field(default_factory=lambda: {"abdomen": (40.0, 400.0), "chest": (-350.0, 1400.0),
                                                      "brain": (40.0, 100.0)})
    # The physical field of view (mm, square) of the model's frame per body region, for models trained at one
    # scale (the generator draws every region at data/anatomy.py FOV_MM): a slice whose region is known is shown
    # at that scale and padded when smaller (`processing.frame_shares`), so a scan cut into the body keeps the
    # size of its anatomy. Empty: every slice fills the frame (the full size, trained on real scans of any scale).
    field_of_view_mm: dict = field(default_factory=dict)
    # Key prefix of ours → pinned base weights (checkpoints/base_weights.py) that fill it: such tensors are frozen,
    # come from the registry package on load and are not stored in our checkpoint (the lite preset).
    base_weights: dict = field(default_factory=dict)
    # "minilm" (ours, the lite preset): each user query is also read by the frozen all-MiniLM-L6-v2 encoder and
    # its contextual states, through a zero-initialised Linear(384, hidden), are added to the query's own token
    # embeddings (the language model shares MiniLM's WordPiece vocabulary, so positions match one to one).
    # `query_markers` are the token ids that open ("start") and close ("end") a user query in the template.
    query_encoder: str | None = None
    query_markers: dict = field(default_factory=dict)
    # Round numbers in the text (the lite preset from session 35): each answer opens with "round N:" (fed, not
    # generated) and a query with a reference says "(about round M: <what round M segmented>)" (`PromptBuilder.
    # user`). Lite ignored the reference's crop and box without them.
    round_tags: bool = False

    def __post_init__(self):
        try:
            self.ct_windows = {str(k): (float(v[0]), float(v[1])) for k, v in dict(self.ct_windows).items()}
        except (TypeError, ValueError, IndexError, KeyError):
            raise ConfigError(f"ct_windows must map a region to (level, width), got {self.ct_windows!r}") from None
        if any(width <= 0 for _, width in self.ct_windows.values()):
            raise ConfigError(f"ct_windows: every width must be positive, got {self.ct_windows!r}")
        try:
            self.field_of_view_mm = {str(k): float(v) for k, v in dict(self.field_of_view_mm or {}).items()}
        except (TypeError, ValueError):
            raise ConfigError(f"field_of_view_mm must map a region to millimetres, got {self.field_of_view_mm!r}") from None
        if any(not (mm > 0 and mm < float("inf")) for mm in self.field_of_view_mm.values()):
            raise ConfigError(f"field_of_view_mm: every field must be a positive size, got {self.field_of_view_mm!r}")
        if self.segmenter_normalization not in ("minmax", "sam_mean_std"):
            raise ConfigError(f"segmenter_normalization must be 'minmax' or 'sam_mean_std', got {self.segmenter_normalization!r}")
        if type(self.round_tags) is not bool:
            raise ConfigError(f"round_tags must be true or false, got {self.round_tags!r}")
        if self.chat_template not in ("plain", "llava_mistral"):
            raise ConfigError(f"chat_template must be 'plain' or 'llava_mistral', got {self.chat_template!r}")
        if self.segmenter.prompt_dim != 256:
            raise ConfigError("segmenter.prompt_dim must be 256 (the MedSAM prompt and JCM width)")
        if not 0.0 <= self.jcm.beta <= 1.0:
            raise ConfigError(f"jcm.beta must lie in [0, 1], got {self.jcm.beta}")
        if self.jcm.trained is not None and type(self.jcm.trained) is not bool:
            raise ConfigError(f"jcm.trained must be true, false or null, got {self.jcm.trained!r}")

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "MediRoundConfig":
        parts = {"text": TextConfig, "vision": VisionConfig, "segmenter": SegmenterConfig, "jcm": JCMConfig}
        try:
            kwargs = dict(data)
            for name, klass in parts.items():
                if name in kwargs:
                    kwargs[name] = _build(klass, kwargs[name], f"{source}: {name}")
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                       and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if missing:
                raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
            unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
            for key in ("lora_target_modules",):
                if key in kwargs:
                    kwargs[key] = tuple(kwargs[key])
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MediRoundConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))


def _build(klass, values, source):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected an object, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(klass)}
    required = {f.name for f in dataclasses.fields(klass)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
    values = dict(values)
    if "global_attn_indexes" in values:
        values["global_attn_indexes"] = tuple(values["global_attn_indexes"])
    return klass(**values)


def full_config() -> MediRoundConfig:
    """The paper's model: LLaVA-Med v1.5 (Mistral-7B, CLIP ViT-L/14-336) + MedSAM ViT-B at 1024²."""
    return MediRoundConfig(
        size="full",
        text=TextConfig(vocab_size=32000 + 4, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=1_000_000.0, rms_norm_eps=1e-5),
        vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14),
        segmenter=SegmenterConfig(image_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                  global_attn_indexes=(2, 5, 8, 11), window_size=14),
        segmenter_normalization="sam_mean_std",
        chat_template="llava_mistral",
    )


# The generator's field of view per region (data/anatomy.py FOV_MM): the scale the tiny and lite presets train at.
GENERATED_FIELD_OF_VIEW_MM = {"abdomen": 380.0, "chest": 380.0, "brain": 230.0}


def tiny_config(vocab_size: int = 1024) -> MediRoundConfig:
    """MediRound-Tiny: same classes, small widths, 256² segmenter input; trained by us (the previous default)."""
    return MediRoundConfig(
        size="tiny",
        text=TextConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        rope_theta=10_000.0),
        vision=VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                            image_size=128, patch_size=16),
        segmenter=SegmenterConfig(image_size=256, patch_size=16, embed_dim=128, depth=4, num_heads=4,
                                  global_attn_indexes=(1, 3), window_size=8, decoder_mlp_dim=512),
        segmenter_normalization="minmax",
        chat_template="plain",
        field_of_view_mm=dict(GENERATED_FIELD_OF_VIEW_MM),
    )


def lite_segmenter_config() -> SegmenterConfig:
    """LiteMedSAM: TinyViT encoder at 256² (64² embedding), SAM's prompt encoder and mask decoder (as MedSAM's)."""
    return SegmenterConfig(image_size=256, patch_size=4, encoder="tiny_vit", tiny_vit=TinyViTConfig(),
                           decoder_depth=2, decoder_mlp_dim=2048, decoder_heads=8)


# Vocabulary of all-MiniLM-L6-v2's WordPiece tokenizer; the lite language model's rows 0..30521 start from its
# word embeddings, our four tokens follow.
MINILM_VOCAB = 30522
LITE_BASE_WEIGHTS = {"segmenter.image_encoder.": "lite_medsam", "segmenter.prompt_encoder.": "lite_medsam",
                     "query_encoder.": "minilm"}
# The plain template's "user:" and "\nassistant:" in MiniLM's WordPiece (the newline is whitespace to BERT).
LITE_QUERY_MARKERS = {"start": [5310, 1024], "end": [3353, 1024]}


def lite_config(vocab_size: int = MINILM_VOCAB + 4) -> MediRoundConfig:
    """MediRound-Lite, the default model: the paper's architecture on pretrained medical and language parts.
    Segmenter LiteMedSAM (TinyViT 256² → 64², SAM prompt encoder and mask decoder; encoder and prompt encoder
    frozen), language model a small Mistral decoder (4 × 384, the width of MiniLM) reading MiniLM's WordPiece
    tokens with embeddings initialised from MiniLM's (tied input/output) and, added to each query's tokens, the
    query's states from the frozen all-MiniLM-L6-v2 encoder; vision tower as the tiny preset's."""
    tiny = tiny_config()
    return MediRoundConfig(
        size="lite",
        text=TextConfig(vocab_size=vocab_size, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
                        rope_theta=10_000.0, tie_word_embeddings=True),
        vision=tiny.vision,
        segmenter=lite_segmenter_config(),
        segmenter_normalization="minmax",
        chat_template="plain",
        field_of_view_mm=dict(GENERATED_FIELD_OF_VIEW_MM),
        base_weights=dict(LITE_BASE_WEIGHTS),
        query_encoder="minilm",
        query_markers={k: list(v) for k, v in LITE_QUERY_MARKERS.items()},
        round_tags=True,
    )


PRESETS = {"full": full_config, "tiny": tiny_config, "lite": lite_config}
