"""Qwen2-VL and Qwen2.5-VL: a vision tower over video frames (or images) and the language model.

Towers and sites:
    vision.embed, vision.blocks.{L}.{point}    the vision encoder's patches: each temporal patch
                                               (2 frames) of h x w patches, all clips' patches
                                               concatenated ([row, d]); Qwen2.5-VL reorders a
                                               frame's patches into attention windows, never
                                               across frames, so each row's frame is exact
    decoder.embed, decoder.blocks.{L}.{point}  the language model over the prompt, in which each
                                               <|video_pad|> (<|image_pad|>) was expanded into one
                                               token per 2 x 2 merged patches, frame by frame

A clip's input is its video (frames [frame, height, width, 3] uint8 with their times, as the
workflow's frame sampling writes them) or an image, and a text: the prompt (holding
<|vision_start|><|video_pad|><|vision_end|>, or put after it in a user turn). Decoder positions
say which tokens belong to which video frame (kind "video", frame index, time of the frame),
so that "video frames 2-4" can be selected; text tokens carry their strings. Prompts are
right-padded (causal: padding never reaches real tokens).

Video frames are patchified here, not by transformers' video processor (which needs
torchvision): each frame goes through the image processor (resize to the patch grid, rescale,
normalise), the frames are padded to a multiple of temporal_patch_size with the last frame, and
each group of temporal_patch_size frames becomes one temporal patch, its patches flattened in
the processor's merge order as (channel, time, patch_h, patch_w) -- the layout of the video
processor's patchify. The prompt's <|video_pad|> is expanded to t * h * w / merge**2 tokens
(what the model's get_rope_index and forward expect for video_grid_thw = (t, h, w)). A video
token's `frame` is its temporal patch (sampled frames [frame * T, (frame + 1) * T), T =
temporal_patch_size) and its `time` the time of the first of those frames; Qwen2.5-VL gets
second_per_grid_ts = T x the frame interval of the clip's times. Images take the same route
(image processor, <|image_pad|> expanded here), so the adapter uses only the processor's
tokenizer, image processor and chat template: `ProcessorParts` when the full processor cannot
load without torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.lm import prompt_positions
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import flat_positions, patch_positions
from affectlens.models.sites import Site, SiteError

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _model_class(family: str):
    import transformers

    return {"qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration}[family]


class QwenVLAdapter(Adapter):
    families = ("qwen2-vl", "qwen2.5-vl")
    sample_rate = 0  # no audio
    frame_rate = 0.0
    inputs = ("video", "text")

    def __init__(self, model: nn.Module, model_id: str, revision: str = "", device: str | None = None, *,
                 family: str = "qwen2-vl", processor=None):
        if family not in self.families:
            raise ValueError(f"Qwen-VL family {family!r}: choose one of {self.families}")
        super().__init__(model, model_id, revision, str(input_device(model)) if device is None else device)
        self.family = family
        self.processor = processor
        self.visual = model.model.visual
        self.lm_layers = model.model.language_model.layers
        cfg = model.config
        self.placeholders = {cfg.video_token_id: "video", cfg.image_token_id: "image"}
        self.merge = self.visual.spatial_merge_size
        self.temporal = getattr(cfg.vision_config, "temporal_patch_size", 2)

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None, family: str = "qwen2-vl") -> "QwenVLAdapter":
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        model, rev, where = load_pretrained(_model_class(family), source, revision, dtype, device, device_map)
        try:
            processor = load_processor(AutoProcessor, where, revision)
        except ImportError as e:  # the processor's video slot needs torchvision; the adapter does not
            if "torchvision" not in str(e).lower():
                raise
            tokenizer = load_processor(AutoTokenizer, where, revision)
            processor = ProcessorParts(tokenizer, load_processor(AutoImageProcessor, where, revision),
                                       getattr(tokenizer, "chat_template", None))
        return cls(model, source, rev, family=family, processor=processor)

    @property
    def n_blocks(self) -> dict[str, int]:
        return {"vision": len(self.visual.blocks), "decoder": len(self.lm_layers)}

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower == "vision":
            return block_hook_point(self.visual.blocks, site, attn="attn", mlp="mlp")
        if site.tower == "decoder":
            return block_hook_point(self.lm_layers, site)
        raise SiteError(f"site {site}: {self.family} has the towers 'vision' and 'decoder'")

    def prompt(self, text: str, kind: str) -> str:
        placeholder = VIDEO if kind == "video" else IMAGE
        if placeholder in text:
            return text
        template = getattr(self.processor, "chat_template", None)
        if template:
            content = [{"type": kind}, {"type": "text", "text": text}]
            return self.processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                                chat_template=template, add_generation_prompt=True,
                                                                tokenize=False)
        return f"<|im_start|>user\n{placeholder}{text}<|im_end|>\n<|im_start|>assistant\n"

    def prepare(self, clips: list[dict]) -> Batch:
        """Clips {"video": {"frames", "times"} | "image": array, "text": str}: one kind per batch
        (the vision tower runs once per kind)."""
        if self.processor is None:
            raise ValueError(f"{self.model_id}: no processor; pass one to QwenVLAdapter")
        kinds = {"video" if c.get("video") is not None else "image" for c in clips}
        if len(kinds) != 1:
            raise ValueError("a batch mixes video and image clips; extract them separately")
        kind = kinds.pop()
        prompts = [self.prompt(c.get("text") or "", kind) for c in clips]
        if kind == "video":
            pixels, grids = zip(*(self.video_pixels(c["video"]["frames"]) for c in clips))
        else:
            pixels, grids = zip(*(self.image_pixels(c["image"]) for c in clips))
        prompts = [self._expand(p, kind, t * h * w // self.merge**2) for p, (t, h, w) in zip(prompts, grids)]
        # The tokenizer, not the processor: the processor refuses video tokens without its video
        # processor (torchvision); the expansion above is the processor's own.
        enc = dict(self.processor.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right"))
        enc["pixel_values_videos" if kind == "video" else "pixel_values"] = torch.cat(pixels)
        enc[f"{kind}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        cfg = self.model.config
        enc["mm_token_type_ids"] = ((enc["input_ids"] == cfg.image_token_id).long()
                                    + 2 * (enc["input_ids"] == cfg.video_token_id).long())
        if kind == "video" and self.family == "qwen2.5-vl":
            enc["second_per_grid_ts"] = torch.tensor(
                [self.temporal * _frame_interval(c["video"].get("times")) for c in clips])
        grids = enc[f"{kind}_grid_thw"].tolist()
        vision, decoder = [], []
        for i, ((t, h, w), ids, mask) in enumerate(zip(grids, enc["input_ids"].numpy(), enc["attention_mask"].numpy())):
            frame_time = None
            if kind == "video":
                ts = np.asarray(clips[i]["video"].get("times", np.arange(t * self.temporal)), dtype=np.float64)
                frame_time = ts[np.minimum(np.arange(t) * self.temporal, len(ts) - 1)]
            vision.append(patch_positions((t, h, w), kind, frame_time))
            per_frame = (h * w) // self.merge**2
            frames = {kind: np.repeat(np.arange(t), per_frame)} if kind == "video" else {}
            times = {kind: np.repeat(frame_time, per_frame)} if kind == "video" else {}
            tokens = self.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
            decoder.append(prompt_positions(ids, mask, tokens, self.placeholders, times, frames))
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in enc.items() if isinstance(v, torch.Tensor)}
        pixel_key = "pixel_values_videos" if kind == "video" else "pixel_values"
        meta = {"family": self.family, "flat_towers": {"vision"},
                "flat_rows": {pixel_key: [t * h * w for t, h, w in grids]}}
        return Batch(inputs, [len(p) for p in decoder], meta, {"vision": flat_positions(vision), "decoder": decoder})

    def video_pixels(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[frame, height, width, 3] uint8 -> (pixel_values_videos [t * h * w, 3 * T * p * p],
        video_grid_thw (t, h, w)), T = temporal_patch_size, p = patch size; see the module docstring."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"{self.model_id}: video frames must be [frame, height, width, 3] with at least one "
                             f"frame, got shape {frames.shape}")
        image_processor = self.processor.image_processor
        for name, want in (("temporal_patch_size", self.temporal), ("merge_size", self.merge)):
            if getattr(image_processor, name, want) != want:
                raise ValueError(f"{self.model_id}: the image processor's {name} is "
                                 f"{getattr(image_processor, name)}, the model's {want}; load the model's own processor")
        T, p = self.temporal, image_processor.patch_size
        if pad := -len(frames) % T:  # the video processor's padding: repeat the last frame
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        # Frame sizes follow the video processor's pixel bounds when the processor has one.
        size = getattr(getattr(self.processor, "video_processor", None), "size", None)
        enc = image_processor(images=list(frames), return_tensors="pt", **({"size": dict(size)} if size else {}))
        _, h, w = enc["image_grid_thw"][0].tolist()
        n, t = len(frames), len(frames) // T
        # Each image patch holds its frame T times ([channel, T, p, p]); keep one copy per frame and
        # put T consecutive frames in the T slots of one temporal patch.
        per_frame = enc["pixel_values"].reshape(n, h * w, 3, T, p, p)[:, :, :, 0]
        grouped = per_frame.reshape(t, T, h * w, 3, p, p).permute(0, 2, 3, 1, 4, 5)
        return grouped.reshape(t * h * w, 3 * T * p * p), (t, h, w)

    def image_pixels(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[height, width, 3] uint8 -> (pixel_values [h * w, 3 * T * p * p], image_grid_thw (1, h, w))."""
        enc = self.processor.image_processor(images=[np.asarray(image)], return_tensors="pt")
        return enc["pixel_values"], tuple(enc["image_grid_thw"][0].tolist())

    def _expand(self, prompt: str, kind: str, n_tokens: int) -> str:
        token = f"<|{kind}_pad|>"
        if prompt.count(token) != 1:
            raise ValueError(f"{self.model_id}: a {kind} prompt needs exactly one {token}, found "
                             f"{prompt.count(token)} in {prompt[:200]!r}")
        return prompt.replace(token, token * n_tokens)

    def run_from(self, batch: Batch, site: str, activation: torch.Tensor, capture=(), interventions=None):
        """From a decoder site on, the vision tower's output is overwritten: skip it (the token
        ids, grids and token types still give the LM its multimodal rotary positions)."""
        if not site.startswith("decoder."):
            return super().run_from(batch, site, activation, capture, interventions)
        text_only = Batch({k: v for k, v in batch.inputs.items() if k not in ("pixel_values", "pixel_values_videos")},
                          batch.n_frames, batch.meta, batch.positions)
        return self.run(text_only, capture=capture,
                        interventions={**(interventions or {}), site: lambda act, _: activation})

    def forward(self, batch: Batch) -> torch.Tensor:
        """Next-token logits [clip, token, vocab]."""
        return self.model(**batch.inputs, use_cache=False).logits


@dataclass
class ProcessorParts:
    """What the adapter uses of a Qwen-VL processor, loadable without torchvision (the full
    processor's video slot imports it): the tokenizer, the image processor, the chat template.
    Videos then take the image processor's pixel bounds (video_preprocessor_config.json is not
    read)."""

    tokenizer: object
    image_processor: object
    chat_template: str | None = None


def _frame_interval(times) -> float:
    """Seconds between sampled frames (1 s when the clip gives no times or a single frame)."""
    if times is None or len(times) < 2:
        return 1.0
    return float(np.median(np.diff(np.asarray(times, dtype=np.float64))))
