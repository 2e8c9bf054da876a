"""Qwen2-Audio: a Whisper-style audio encoder and a Qwen2 language model reading it.

Towers and sites:
    audio.embed, audio.blocks.{L}.{point}     the audio encoder at 50 frames/s (before its 2x
                                              average pooling into 25 tokens/s)
    decoder.embed, decoder.blocks.{L}.{point} the language model over the whole prompt, whose
                                              <|AUDIO|> placeholder the processor expanded into
                                              one token per 40 ms of audio

A clip's input is its audio and a text: the prompt (with <|audio_bos|><|AUDIO|><|audio_eos|>, or
the chat template's user turn around the text when it has no placeholder). Decoder positions say
which tokens are the audio span (kind "audio", time of each token) and which are text (with
their strings); the processor pads every clip's audio to the 30 s window and the encoder masks
the padding, and prompts are right-padded (causal: padding never reaches real tokens).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.lm import prompt_positions
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import audio_positions
from affectlens.models.sites import Site, SiteError

SAMPLE_RATE = 16000
PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"


class Qwen2AudioAdapter(Adapter):
    family = "qwen2-audio"
    sample_rate = SAMPLE_RATE
    frame_rate = 50.0  # audio tower frames; the LM's audio tokens come at 25 per second
    inputs = ("audio", "text")

    def __init__(self, model: Qwen2AudioForConditionalGeneration, model_id: str, revision: str = "",
                 device: str | None = None, *, processor=None):
        super().__init__(model, model_id, revision, str(input_device(model)) if device is None else device)
        self.processor = processor
        inner = model.model
        self.audio_tower = inner.audio_tower
        self.lm_layers = inner.language_model.layers
        self.audio_token_id = model.config.audio_token_id

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None) -> "Qwen2AudioAdapter":
        model, rev, where = load_pretrained(Qwen2AudioForConditionalGeneration, source, revision, dtype, device,
                                            device_map)
        return cls(model, source, rev, processor=load_processor(AutoProcessor, where, revision))

    @property
    def n_blocks(self) -> dict[str, int]:
        return {"audio": len(self.audio_tower.layers), "decoder": len(self.lm_layers)}

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower == "audio":
            return block_hook_point(self.audio_tower.layers, site, mlp="fc2")
        if site.tower == "decoder":
            return block_hook_point(self.lm_layers, site)
        raise SiteError(f"site {site}: Qwen2-Audio has the towers 'audio' and 'decoder'")

    def prompt(self, text: str) -> str:
        """The clip's text as a prompt: kept when it holds the audio placeholder, else put after
        the audio in a user turn of the chat template."""
        if "<|AUDIO|>" in text:
            return text
        messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare(self, clips: list[dict]) -> Batch:
        if self.processor is None:
            raise ValueError(f"{self.model_id}: no processor; pass one to Qwen2AudioAdapter")
        waves = [np.asarray(c["audio"], dtype=np.float32) for c in clips]
        prompts = [self.prompt(c.get("text") or "") for c in clips]
        self.processor.tokenizer.padding_side = "right"
        enc = self.processor(text=prompts, audio=waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
        mel = enc["feature_attention_mask"].sum(-1)
        n_audio = ((mel - 1) // 2 + 1).tolist()  # encoder frames: conv stride 2 over 100 mel frames/s
        n_tokens = [(n - 2) // 2 + 1 for n in n_audio]  # after the 2x average pooling
        decoder = []
        for ids, mask, n in zip(enc["input_ids"].numpy(), enc["attention_mask"].numpy(), n_tokens):
            tokens = self.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
            decoder.append(prompt_positions(ids, mask, tokens, {self.audio_token_id: "audio"},
                                            times={"audio": np.arange(n) / 25.0}))
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in enc.items()}
        return Batch(inputs, n_audio, {"family": self.family},
                     {"audio": [audio_positions(n, self.frame_rate) for n in n_audio], "decoder": decoder})

    def forward(self, batch: Batch) -> torch.Tensor:
        """Next-token logits [clip, token, vocab]."""
        return self.model(**batch.inputs, use_cache=False).logits
