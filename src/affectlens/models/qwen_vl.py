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

Video frames go through the model's own video processor, which needs torchvision.
"""

from __future__ import annotations

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
        from transformers import AutoProcessor

        model, rev, where = load_pretrained(_model_class(family), source, revision, dtype, device, device_map)
        return cls(model, source, rev, family=family, processor=load_processor(AutoProcessor, where, revision))

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
        if getattr(self.processor, "chat_template", None):
            content = [{"type": kind}, {"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
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
            visual = {"videos": [np.asarray(c["video"]["frames"]) for c in clips]}
        else:
            visual = {"images": [np.asarray(c["image"]) for c in clips]}
        enc = self.processor(text=prompts, return_tensors="pt", padding=True, padding_side="right", **visual)
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
        return Batch(inputs, [len(p) for p in decoder], {"family": self.family, "flat_towers": {"vision"}},
                     {"vision": flat_positions(vision), "decoder": decoder})

    def forward(self, batch: Batch) -> torch.Tensor:
        """Next-token logits [clip, token, vocab]."""
        return self.model(**batch.inputs, use_cache=False).logits
