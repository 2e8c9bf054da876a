"""Qwen2.5-Omni and Qwen3-Omni (Qwen3OmniMoe*): the Thinker with its audio and vision towers.

Towers and sites:
    audio.embed, audio.blocks.{L}.{point}      the audio encoder (Qwen2.5-Omni: 50 frames/s before
                                               its 2x pooling; Qwen3-Omni: 13 frames per second-long
                                               chunk of audio, one per LLM audio token)
    vision.embed, vision.blocks.{L}.{point}    the vision encoder's patches (images or video frames)
    thinker.embed, thinker.blocks.{L}.{point}  the Thinker LM over the whole prompt (mlp_out is
                                               the mixture-of-experts output in Qwen3-Omni)

A clip's input is its audio and text, plus video frames for a video source: the prompt holds the
placeholders (<|audio_start|><|audio_pad|><|audio_end|>, <|vision_start|><|video_pad|>
<|vision_end|>) or is put after them in a user turn. The processor expands each placeholder into
one token per audio frame / merged patch; Thinker positions say which rows are the audio span
(with each token's time), which are video tokens (with their frame), and which are text (with
their strings). The audio and vision encoders run on all real frames of the batch concatenated
([row, d], no padding); their positions index those rows.

Qwen3-Omni adds its vision "deepstack" features to the Thinker's hidden state after its first
blocks, outside the blocks: such a block's resid_post is before that addition.
The Talker and its code predictor are not exposed yet.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.lm import prompt_positions
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import Positions, flat_positions, patch_positions
from affectlens.models.sites import Site, SiteError

SAMPLE_RATE = 16000
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _classes(family: str):
    import transformers

    if family == "qwen2.5-omni":
        return transformers.Qwen2_5OmniForConditionalGeneration, transformers.Qwen2_5OmniThinkerForConditionalGeneration
    return transformers.Qwen3OmniMoeForConditionalGeneration, transformers.Qwen3OmniMoeThinkerForConditionalGeneration


def audio_times(family: str, n_mel: int) -> tuple[np.ndarray, np.ndarray]:
    """(audio-encoder frame times, Thinker audio-token times) in seconds for n_mel mel frames (100/s)."""
    if family == "qwen2.5-omni":
        frames = (n_mel - 1) // 2 + 1  # conv stride 2: 50/s, pooled 2x into 25 tokens/s
        return np.arange(frames) / 50.0, np.arange((frames - 2) // 2 + 1) / 25.0
    full, rest = divmod(n_mel, 100)  # Qwen3-Omni: 1 s chunks, 13 frames each (3 stride-2 convs)
    last = (((rest - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1 if rest else 0
    t = np.concatenate([c + np.arange(13) * 0.08 for c in range(full)] + [full + np.arange(last) * 0.08])
    return t, t


class QwenOmniAdapter(Adapter):
    families = ("qwen2.5-omni", "qwen3-omni")
    sample_rate = SAMPLE_RATE
    frame_rate = 50.0
    inputs = ("audio", "text")

    def __init__(self, model: nn.Module, model_id: str, revision: str = "", device: str | None = None, *,
                 family: str = "qwen3-omni", processor=None):
        if family not in self.families:
            raise ValueError(f"Qwen-Omni family {family!r}: choose one of {self.families}")
        thinker = getattr(model, "thinker", model)  # the full model, or a Thinker alone
        super().__init__(model, model_id, revision, str(input_device(thinker)) if device is None else device)
        self.family = family
        self.frame_rate = 50.0 if family == "qwen2.5-omni" else 13.0
        self.thinker = thinker
        self.audio_tower = thinker.model.audio_tower
        self.visual = thinker.model.visual
        self.lm_layers = thinker.model.language_model.layers
        self.processor = processor
        cfg = thinker.config
        self.placeholders = {cfg.audio_token_id: "audio", cfg.video_token_id: "video", cfg.image_token_id: "image"}

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None, family: str = "qwen3-omni") -> "QwenOmniAdapter":
        from transformers import AutoProcessor

        full, thinker = _classes(family)
        model, rev, where = load_pretrained(thinker, source, revision, dtype, device, device_map)
        return cls(model, source, rev, family=family, processor=load_processor(AutoProcessor, where, revision))

    @property
    def n_blocks(self) -> dict[str, int]:
        return {"audio": len(self.audio_tower.layers), "vision": len(self.visual.blocks),
                "thinker": len(self.lm_layers)}

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower == "audio":
            return block_hook_point(self.audio_tower.layers, site, mlp="fc2")
        if site.tower == "vision":
            return block_hook_point(self.visual.blocks, site, attn="attn", mlp="mlp")
        if site.tower == "thinker":
            return block_hook_point(self.lm_layers, site)
        raise SiteError(f"site {site}: {self.family} exposes the towers 'audio', 'vision' and 'thinker'")

    def prompt(self, text: str, video: bool = False) -> str:
        """The clip's text as a prompt: kept when it holds the placeholders, else after them in a
        user turn (the processor's chat template when it has one)."""
        if "<|audio_pad|>" in text:
            return text
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "audio"}] + ([{"type": "video"}] if video else []) + [{"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return (f"<|im_start|>user\n{VIDEO if video else ''}{AUDIO}{text}<|im_end|>\n<|im_start|>assistant\n")

    def prepare(self, clips: list[dict]) -> Batch:
        if self.processor is None:
            raise ValueError(f"{self.model_id}: no processor; pass one to QwenOmniAdapter")
        videos = [c.get("video") for c in clips]
        has_video = any(v is not None for v in videos)
        if has_video and not all(v is not None for v in videos):
            raise ValueError("a batch mixes clips with and without video; give every clip frames or none")
        waves = [np.asarray(c["audio"], dtype=np.float32) for c in clips]
        prompts = [self.prompt(c.get("text") or "", has_video) for c in clips]
        kwargs = {"videos": [v["frames"] for v in videos]} if has_video else {}
        enc = self.processor(text=prompts, audio=waves, return_tensors="pt", padding=True, padding_side="right",
                             **kwargs)
        n_mel = enc["feature_attention_mask"].sum(-1).tolist()
        times = [audio_times(self.family, n) for n in n_mel]
        positions = {"audio": flat_positions([_timed(t[0], "audio") for t in times]), "thinker": []}
        video_times = []
        if has_video:
            grids = enc["video_grid_thw"].tolist()
            merge = self.visual.spatial_merge_size
            temporal = getattr(self.visual.config, "temporal_patch_size", 2)
            per_frame, vision = [], []
            for (t, h, w), v in zip(grids, videos):
                ts = np.asarray(v.get("times", np.arange(len(v["frames"]))), dtype=np.float64)
                frame_time = ts[np.minimum(np.arange(t) * temporal, len(ts) - 1)]
                vision.append(patch_positions((t, h, w), "video", frame_time))
                per_frame.append((h * w) // merge**2)
                video_times.append(frame_time)
            positions["vision"] = flat_positions(vision)
        for i, (ids, mask) in enumerate(zip(enc["input_ids"].numpy(), enc["attention_mask"].numpy())):
            tokens = self.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
            kinds_times, kinds_frames = {"audio": times[i][1]}, {}
            if has_video:
                n = per_frame[i]
                frames = np.repeat(np.arange(len(video_times[i])), n)
                kinds_frames["video"], kinds_times["video"] = frames, video_times[i][frames]
            positions["thinker"].append(prompt_positions(ids, mask, tokens, self.placeholders, kinds_times, kinds_frames))
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in enc.items() if isinstance(v, torch.Tensor)}
        return Batch(inputs, [len(p) for p in positions["audio"]], {"family": self.family,
                                                                    "flat_towers": {"audio", "vision"}}, positions)

    def forward(self, batch: Batch) -> torch.Tensor:
        """The Thinker's next-token logits [clip, token, vocab]."""
        return self.thinker(**batch.inputs, use_cache=False).logits


def _timed(times: np.ndarray, kind: str) -> Positions:
    n = len(times)
    return Positions(np.arange(n), np.full(n, kind, dtype=object), times, np.full(n, -1), np.full(n, "", dtype=object))
