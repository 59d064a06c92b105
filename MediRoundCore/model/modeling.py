"""MediRound: a LLaVA-style MLLM with a `[SEG]` token, MedSAM's image encoder and mask decoder, reference
crop/box features, and the Judgment & Correction Mechanism.

Module names (the keys of our checkpoints):
  language_model.*   transformers MistralForCausalLM       vision_tower.*  transformers CLIPVisionModel
  mm_projector.{0,2} Linear–GELU–Linear (LLaVA mlp2x_gelu)  box_encoder     Linear(4, hidden)
  seg_projection.{0,2} Linear(h,h)–ReLU–Linear(h,256)     segmenter.*     segment_anything Sam (MedSAM)
  jcm.quality.fc{1,2,3}, jcm.correction.fc{1,2,3}       (ours, optional) jcm.correction.{context,attention}.*, jcm.refiner.*
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from .._sam import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from .config import MediRoundConfig
from .decoder_image_side import two_way_forward
from .jcm import build_jcm, refiner_image
from .processing import SAM_MEAN, SAM_STD
from .query_encoder_step import QueryEncoderStep
from .tiny_vit import build_tiny_vit
from .tokenizer import TokenIds


IGNORE_INDEX = -100  # labels not trained on (torch's and transformers' ignore index)
# a forward that returns only the last position's logits (the rest are never read); transformers < 4.50 named it
# num_logits_to_keep, older ones had neither
_FORWARD_PARAMS = inspect.signature(MistralForCausalLM.forward).parameters
LAST_LOGITS_ONLY = ({"logits_to_keep": 1} if "logits_to_keep" in _FORWARD_PARAMS else
                    {"num_logits_to_keep": 1} if "num_logits_to_keep" in _FORWARD_PARAMS else {})


def _version_of(tensor: torch.Tensor):
    """A tensor's version counter, or None for an inference-mode tensor (which has none)."""
    return None if tensor.is_inference() else tensor._version


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def build_language_model(cfg) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, sliding_window=cfg.sliding_window,
        # transformers 5 reads rope_parameters, 4.x (Slicer 5.8) rope_theta: both, or 4.x falls back to 10000
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config)


def build_vision_tower(cfg) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="quick_gelu",
    )
    return CLIPVisionModel(config)


def build_segmenter(cfg) -> Sam:
    """SAM/MedSAM (ViT image encoder, prompt encoder, mask decoder) at the configured size; with
    `encoder="tiny_vit"`, LiteMedSAM (TinyViT image encoder, the same prompt encoder and mask decoder)."""
    grid = cfg.embedding_size
    prompt = PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3, transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                                                 mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
        transformer_dim=cfg.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return Sam(image_encoder=build_image_encoder(cfg), prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=list(SAM_MEAN), pixel_std=list(SAM_STD))


def build_image_encoder(cfg) -> nn.Module:
    """The segmenter's image encoder: (B,3,S,S) → (B,256,S/p,S/p)."""
    if cfg.encoder == "tiny_vit":
        return build_tiny_vit(cfg.tiny_vit, cfg.image_size, cfg.prompt_dim)
    return ImageEncoderViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=4, out_chans=cfg.prompt_dim, qkv_bias=True,
        norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), use_rel_pos=True, global_attn_indexes=cfg.global_attn_indexes,
        window_size=cfg.window_size,
    )


@dataclass
class SegOutput:
    """Masks decoded from [SEG] prompts: low-resolution logits, the JCM score and decision."""

    low_res_logits: torch.Tensor  # (K,1,h,w)
    prompts: torch.Tensor  # (K,256) the embeddings actually decoded
    scores: torch.Tensor | None  # (K,) quality scores, or None when JCM is off
    corrected: torch.Tensor | None  # (K,) bool
    refined_logits: torch.Tensor | None = None  # (K,1,S,S) full-resolution logits, when a JCM refiner redrew masks

    @property
    def logits(self) -> torch.Tensor:
        """The mask logits to use: the refiner's full-resolution ones if it ran, else the decoder's low-res ones."""
        return self.low_res_logits if self.refined_logits is None else self.refined_logits


class MediRound(nn.Module):
    """The whole model. See the module docstring for its parts; `MediRoundCore.engine` drives inference."""

    def __init__(self, config: MediRoundConfig, token_ids: TokenIds):
        super().__init__()
        self.config = config
        self.token_ids = token_ids
        h = config.text.hidden_size
        self.language_model = build_language_model(config.text)
        self.vision_tower = build_vision_tower(config.vision)
        self.mm_projector = nn.Sequential(nn.Linear(config.vision.hidden_size, h), nn.GELU(), nn.Linear(h, h))
        self.box_encoder = nn.Linear(4, h)
        self.seg_projection = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, config.segmenter.prompt_dim))
        self.segmenter = build_segmenter(config.segmenter)
        self.jcm = build_jcm(config)
        self._image_side_cache = None  # (weakref to a slice's embedding, key, ImageSide): `cached_image_side`
        self.query_encoder = self.query_projection = None
        if config.query_encoder == "minilm":
            from .text_encoder import build_bert

            self.query_encoder = build_bert()
            self.query_projection = nn.Linear(self.query_encoder.config.hidden_size, h)
            nn.init.zeros_(self.query_projection.weight)
            nn.init.zeros_(self.query_projection.bias)
        elif config.query_encoder is not None:
            raise ValueError(f"unknown query_encoder {config.query_encoder!r}")
        self.embedding_cache = None  # train/embedding_cache.py: a frozen encoder's embeddings kept on disk

    def train(self, mode: bool = True):
        """As nn.Module.train, but frozen base parts (`config.base_weights`) stay in eval mode: LiteMedSAM's
        BatchNorm statistics and MiniLM's dropout are as published whatever the rest of the model does."""
        super().train(mode)
        for prefix in self.config.base_weights:
            try:
                self.get_submodule(prefix.rstrip(".")).eval()
            except AttributeError:  # a parameter prefix, not a module
                pass
        return self

    @property
    def device(self) -> torch.device:
        return self.box_encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.box_encoder.weight.dtype

    # -- encoders -----------------------------------------------------------------------------------
    def encode_segmenter_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) → (B,256,g,g) dense image embedding (MedSAM encoder; through `embedding_cache` if set)."""
        if self.embedding_cache is not None:
            return self.embedding_cache.encode(self.segmenter.image_encoder, pixels.to(self.device, self.dtype))
        return self.segmenter.image_encoder(pixels.to(self.device, self.dtype))

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.vision.select_layer]

    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) → (B,N,h) projected patch tokens (LLaVA: select layer, patches without CLS)."""
        return self.mm_projector(self._vision_features(pixels)[:, 1:])

    def encode_crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """(K,3,S,S) reference crops → (K,h): the vision tower's CLS feature through the projector."""
        return self.mm_projector(self._vision_features(pixels)[:, 0])

    def encode_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(K,4) normalised boxes → (K,h)."""
        return self.box_encoder(boxes.to(self.device, self.dtype))

    # -- language model ------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None,
                     crop_tokens: torch.Tensor | None = None, box_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with placeholders filled: `<image>` runs by image tokens (B,N,h) in order,
        `<crop>`/`<box>` by the rows of crop_tokens / box_tokens (K,h) in reading order (batch-major)."""
        ids = input_ids.to(self.device)
        embeds = self.language_model.get_input_embeddings()(ids)
        if self.query_encoder is not None:
            embeds = embeds + self.query_states(ids).to(embeds.dtype)
        fills = ((self.token_ids.image, image_tokens), (self.token_ids.crop, crop_tokens), (self.token_ids.box, box_tokens))
        for token, values in fills:
            where = ids == token
            count = int(where.sum())
            if count == 0:
                continue
            if values is None:
                raise ValueError(f"the sequence has {count} placeholder(s) of token {token} but no features")
            flat = values.reshape(-1, values.shape[-1]).to(embeds.dtype)
            if flat.shape[0] != count:
                raise ValueError(f"{count} placeholder(s) of token {token} but {flat.shape[0]} feature rows")
            embeds = embeds.masked_scatter(where.unsqueeze(-1), flat)
        return embeds

    def query_spans(self, ids: torch.Tensor) -> list[tuple[int, int, int]]:
        """(row, start, end) of every user query in a batch of token ids: the tokens after a start marker
        ("user:", then any <crop>/<box>) up to the end marker ("assistant:")."""
        start, end = self.config.query_markers["start"], self.config.query_markers["end"]
        skip = {self.token_ids.crop, self.token_ids.box}
        spans = []
        for row, seq in enumerate(ids.tolist()):
            i = 0
            while i <= len(seq) - len(start):
                if seq[i:i + len(start)] != start:
                    i += 1
                    continue
                s = i + len(start)
                while s < len(seq) and seq[s] in skip:
                    s += 1
                e = s
                while e < len(seq) and seq[e:e + len(end)] != end:
                    e += 1
                if e > s:
                    spans.append((row, s, e))
                i = e
        return spans

    def query_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,T,h): at each query token, the frozen query encoder's state of it (the query read alone, between
        [CLS] and [SEP]) through `query_projection`; zero elsewhere."""
        out = torch.zeros(*ids.shape, self.config.text.hidden_size, device=ids.device,
                          dtype=self.query_projection.weight.dtype)
        spans = self.query_spans(ids)
        if not spans:
            return out
        cls, sep, pad = 101, 102, 0  # MiniLM's [CLS], [SEP], [PAD]
        length = max(e - s for _, s, e in spans) + 2
        batch = torch.full((len(spans), length), pad, dtype=torch.long, device=ids.device)
        mask = torch.zeros_like(batch)
        for k, (row, s, e) in enumerate(spans):
            batch[k, : e - s + 2] = torch.cat([ids.new_tensor([cls]), ids[row, s:e], ids.new_tensor([sep])])
            mask[k, : e - s + 2] = 1
        with torch.no_grad():
            step = QueryEncoderStep.for_model(self.query_encoder)  # one query at inference: without per-call work
            if step is not None and step.supports(batch):
                states = step(batch)
            else:
                states = self.query_encoder(input_ids=batch, attention_mask=mask).last_hidden_state
        projected = self.query_projection(states.to(self.query_projection.weight.dtype))
        for k, (row, s, e) in enumerate(spans):
            out[row, s:e] = projected[k, 1: e - s + 1]
        return out

    # -- segmentation --------------------------------------------------------------------------------
    def seg_prompts(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states that predict [SEG] (K,h) → 256-d prompts (K,256)."""
        return self.seg_projection(hidden)

    @property
    def jcm_usable(self) -> bool:
        """Whether the JCM is trained for this model (config.jcm.trained is not False): a stage-1 checkpoint's JCM
        is random or stale, so asking with JCM on decodes its prompt uncorrected."""
        return self.config.jcm.trained is not False

    def decode_masks(self, image_embeddings: torch.Tensor, prompts: torch.Tensor, use_jcm: bool = False,
                     beta: float | None = None, pixels: torch.Tensor | None = None) -> SegOutput:
        """Decode one mask per prompt; image_embeddings is (K,256,g,g) or (1,256,g,g) shared. `pixels`, the
        segmenter input (K or 1,3,S,S), is needed when the JCM has a refiner and corrects a mask."""
        scores = corrected = None
        use_jcm = use_jcm and self.jcm_usable
        if use_jcm:
            def context_of(rows):  # for a context-aware correction: the first decode of the rows it corrects
                embeddings = image_embeddings if image_embeddings.shape[0] == 1 else image_embeddings[rows]
                return self.correction_context(embeddings, prompts[rows])

            prompts, scores, corrected = self.jcm(prompts, self.config.jcm.beta if beta is None else beta, context_of)
        low_res = self.decode_with_prompts(image_embeddings, prompts)
        refined = None
        if use_jcm and self.jcm.refiner is not None and bool(corrected.any()):
            if pixels is None:
                raise ValueError("this JCM redraws corrected masks from the slice: pass the segmenter pixels")
            rows = corrected.nonzero().squeeze(-1)
            full = upsample_logits(self, low_res)
            images = refiner_image(pixels.to(full.device))
            images = images.expand(len(full), -1, -1) if images.shape[0] == 1 else images
            full[rows] = self.jcm.refiner(images[rows], full[rows])
            refined = full[:, None]
        return SegOutput(low_res, prompts, scores, corrected, refined)

    def correction_context(self, image_embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(K,2·256) what the context-aware JCM correction sees of each prompt's first decode."""
        return self.context_from_decode(image_embeddings, *self.decode_with_tokens(image_embeddings, prompts))

    def context_from_decode(self, image_embeddings: torch.Tensor, low_res: torch.Tensor, mask_tokens: torch.Tensor
                            ) -> torch.Tensor:
        """The image embedding averaged under the decoded mask's probabilities, the decoder's mask token, and
        (an attending correction) what the mask token reads from the marked image embedding."""
        if image_embeddings.shape[0] == 1 and low_res.shape[0] > 1:
            image_embeddings = image_embeddings.expand(low_res.shape[0], -1, -1, -1)
        weights = F.adaptive_avg_pool2d(low_res.float().sigmoid(), image_embeddings.shape[-2:])
        pooled = (image_embeddings.float() * weights).sum((-2, -1)) / weights.sum((-2, -1)).clamp(min=1e-3)
        parts = [pooled, mask_tokens.float()]
        attention = self.jcm.correction.attention
        if attention is not None:
            dtype = next(attention.parameters()).dtype
            parts.append(attention(mask_tokens.to(dtype), image_embeddings.to(dtype),
                                   self.dense_positional_encoding().to(dtype), weights.to(dtype)).float())
        return torch.cat(parts, -1).to(mask_tokens.dtype)

    def decode_with_prompts(self, image_embeddings: torch.Tensor, prompts: torch.Tensor,
                            rows: torch.Tensor | None = None) -> torch.Tensor:
        """SAM's mask decoder (single-mask output) for K prompts, each with its own image embedding row (or row
        `rows[k]` of B image embeddings).

        SAM's `MaskDecoder.forward` pairs every prompt with every image; here prompt k meets image row k, in
        one batched pass (the same computation as its `predict_masks`, batched over prompts)."""
        return self.decode_with_tokens(image_embeddings, prompts, rows)[0]

    def decode_with_tokens(self, image_embeddings: torch.Tensor, prompts: torch.Tensor,
                           rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,1,4g,4g) low-res mask logits and (K,256) mask-token outputs; see `decode_with_prompts`."""
        from .decoder_image_side import supports
        from .decoder_upscaling import supports as upscaling_supports, upscaled_masks

        k = prompts.shape[0]
        decoder = self.segmenter.mask_decoder
        pe = self.segmenter.prompt_encoder
        out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(k, -1, -1), prompts.unsqueeze(1).to(out_tokens.dtype)], 1)
        if rows is None:
            side = self.cached_image_side(image_embeddings)
        elif supports(decoder.transformer):  # several rounds on each of a few images (training)
            side = self._first_block_image_side(image_embeddings).rows(rows)
        else:
            side, image_embeddings = None, image_embeddings[rows]
        if side is not None:  # the first block's image side made once per image
            hs, src = two_way_forward(decoder.transformer, side, tokens)
            b, (c, h, w) = k, image_embeddings.shape[1:]
        else:
            if image_embeddings.shape[0] == 1 and k > 1:
                image_embeddings = image_embeddings.expand(k, -1, -1, -1)
            b, c, h, w = image_embeddings.shape
            src = image_embeddings + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
            pos_src = self.dense_positional_encoding().to(src.dtype).expand(k, -1, -1, -1)
            hs, src = decoder.transformer(src, pos_src, tokens)
        mask_token_out = hs[:, 1, :]  # the first mask token: SAM's single-mask output
        hyper = decoder.output_hypernetworks_mlps[0](mask_token_out)
        if side is not None and upscaling_supports(decoder.output_upscaling):  # channels last, no image copies
            return upscaled_masks(decoder.output_upscaling, src, (h, w), hyper), mask_token_out
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        bu, cu, hu, wu = upscaled.shape
        return (hyper.unsqueeze(1) @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, 1, hu, wu), mask_token_out

    def cached_image_side(self, image_embedding: torch.Tensor):
        """The decoder's first-block image side for one slice's embedding (1,256,g,g), kept while the same
        embedding tensor and decoder weights come back (`model/decoder_image_side.py`); None while gradients are
        recorded or autocast is on, for a batch of images, or a transformer of another layout.

        The key holds the embedding's identity and every weight the products read (storage, dtype, version
        counter), so a load, an optimiser step, a cast or a move makes them again. Not seen: changes through
        `.data` (no version bump) and in-place changes of an inference-mode embedding (no version counter);
        callers that do either call `forget_image_side()`."""
        from .decoder_image_side import supports

        transformer = self.segmenter.mask_decoder.transformer
        if (torch.is_grad_enabled() or image_embedding.shape[0] != 1 or not supports(transformer)
                or _autocast_on(image_embedding.device.type)):
            return None
        first = transformer.layers[0]
        pe = self.segmenter.prompt_encoder
        weights = (pe.no_mask_embed.weight, pe.pe_layer.positional_encoding_gaussian_matrix,
                   *first.cross_attn_image_to_token.q_proj.parameters())
        key = (image_embedding.data_ptr(), tuple(image_embedding.shape), image_embedding.dtype,
               _version_of(image_embedding), tuple((w.data_ptr(), w.dtype, _version_of(w)) for w in weights))
        cached = self._image_side_cache
        if cached is not None and cached[0]() is image_embedding and cached[1] == key:
            return cached[2]
        self._image_side_cache = None  # the old slice's products are not kept beside the new ones
        side = self._first_block_image_side(image_embedding)
        self._image_side_cache = (weakref.ref(image_embedding), key, side)
        return side

    def _first_block_image_side(self, image_embeddings: torch.Tensor):
        """`decoder_image_side.image_side` of (B,256,g,g) embeddings, as SAM's decoder prepares its input: the
        no-mask embedding added, the dense positional encoding of the grid."""
        from .decoder_image_side import image_side

        src = image_embeddings + self.segmenter.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return image_side(self.segmenter.mask_decoder.transformer, src,
                          self.dense_positional_encoding().to(src.dtype))

    def forget_image_side(self) -> None:
        """Drop the kept decoder image side (`cached_image_side`), e.g. with the engine's other slice caches."""
        self._image_side_cache = None

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_image_side_cache"] = None  # a weak reference does not pickle; the products are made again
        return state

    def dense_positional_encoding(self) -> torch.Tensor:
        """SAM's dense positional encoding of the embedding grid, computed in float32 whatever the model's dtype
        (SAM builds its coordinate grid in float32, which fails against a bf16 Gaussian matrix)."""
        layer = self.segmenter.prompt_encoder.pe_layer
        matrix = layer.positional_encoding_gaussian_matrix
        if matrix.dtype == torch.float32:
            return self.segmenter.prompt_encoder.get_dense_pe()
        layer.positional_encoding_gaussian_matrix = matrix.float()
        try:
            return self.segmenter.prompt_encoder.get_dense_pe()
        finally:
            layer.positional_encoding_gaussian_matrix = matrix

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_pretrained(self, folder, tokenizer=None, storage_dtype: torch.dtype | None = None,
                        against_bases: bool = False) -> None:
        from ..checkpoints.ours import save_pretrained

        save_pretrained(self, folder, tokenizer, storage_dtype, against_bases)

    @classmethod
    def from_pretrained(cls, folder, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Returns (model, tokenizer) from one of our checkpoint folders."""
        from ..checkpoints.ours import from_pretrained

        return from_pretrained(folder, device=device, dtype=dtype)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, averaged over masks; logits and targets (K,H,W)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(-1)
    return (1 - (2 * inter + eps) / (probs.sum(-1) + targets.sum(-1) + eps)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets)


def valid_region_mask(valid_hw: list[tuple[int, int]], counts: list[int], size: int, device) -> torch.Tensor:
    """(K,S,S) weights: 1 inside each sample's unpadded extent, 0 on the padding."""
    from .processing import pad_offsets

    rows = []
    for (h, w), n in zip(valid_hw, counts):
        m = torch.zeros(size, size, device=device)
        top, left = pad_offsets((h, w), size)
        m[top:top + h, left:left + w] = 1
        rows += [m] * n
    return torch.stack(rows)


def masked_bce(logits, targets, weight, sample_weights=None):
    """Mean BCE over the unpadded pixels; `sample_weights` (K,) weighs each mask's pixels."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if sample_weights is not None:
        weight = weight * sample_weights.reshape(-1, 1, 1)
    return (loss * weight).sum() / weight.sum().clamp(min=1e-6)  # an all-zero weight gives 0, as before


def masked_dice(logits, targets, weight, eps: float = 1.0, sample_weights=None):
    """Mean soft-Dice loss over masks (a weighted mean with `sample_weights`)."""
    probs = (logits.sigmoid() * weight).flatten(1)
    targets = (targets * weight).flatten(1)
    inter = (probs * targets).sum(-1)
    per_mask = 1 - (2 * inter + eps) / (probs.sum(-1) + targets.sum(-1) + eps)
    if sample_weights is None:
        return per_mask.mean()
    return (per_mask * sample_weights).sum() / sample_weights.sum().clamp(min=1e-6)


def seg_hidden_states(model: "MediRound", batch):
    """Teacher-forced language-model pass: (CE loss, (K,h) hidden states that predict [SEG])."""
    image_tokens = model.encode_image_tokens(batch.vision_pixels)
    crops = model.encode_crops(batch.crop_pixels) if batch.crop_pixels is not None else None
    boxes = model.encode_boxes(batch.boxes) if batch.boxes is not None else None
    embeds = model.embed_inputs(batch.input_ids, image_tokens, crops, boxes)
    out = model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask, output_hidden_states=True,
                               **LAST_LOGITS_ONLY)
    last = out.hidden_states[-1]
    hidden = last[batch.seg_positions[:, 0], batch.seg_positions[:, 1]]
    return answer_loss(model.language_model, last, batch.labels), hidden


def answer_loss(language_model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (position t predicts label t+1, mean over labelled tokens, float logits) with
    the LM head run only where a label is: its loss computes the head at every position, image and prompt tokens
    included, which for lite's 30.5 k-word head was most of the language model's training time."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = language_model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


def decode_for_samples(model: "MediRound", image_embeddings, batch, prompts):
    """Upsampled (K,S,S) mask logits of each [SEG] prompt on its own sample's image embedding."""
    rows = batch.seg_positions[:, 0]
    return upsample_logits(model, model.decode_with_prompts(image_embeddings, prompts, rows=rows))


def upsample_logits(model: "MediRound", low_res: torch.Tensor) -> torch.Tensor:
    """(K,1,h,w) low-res mask logits → (K,S,S) at the segmenter's input size."""
    size = model.config.segmenter.image_size
    return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def stage1_losses(model: "MediRound", batch, ce=1.0, bce=2.0, dice=0.5) -> dict:
    """Teacher-forced training forward: CE on the answers, BCE and Dice on the masks (paper's weights)."""
    ce_term, hidden = seg_hidden_states(model, batch)
    image_embeddings = model.encode_segmenter_image(batch.seg_pixels)
    logits = decode_for_samples(model, image_embeddings, batch, model.seg_prompts(hidden))
    weight = valid_region_mask(batch.valid_hw, batch.rounds_per_sample, logits.shape[-1], logits.device)
    bce_term = masked_bce(logits, batch.target_masks, weight)
    dice_term = masked_dice(logits, batch.target_masks, weight)
    return {"loss": ce * ce_term + bce * bce_term + dice * dice_term, "ce": ce_term, "bce": bce_term,
            "dice": dice_term, "logits": logits}
