"""MusicGen: a T5 text encoder conditions a decoder over EnCodec audio tokens.

Towers and sites:
    text.embed, text.blocks.{L}.{point}        the T5 encoder over the description (positions: its
                                               tokens with their strings)
    decoder.embed, decoder.blocks.{L}.{point}  the audio-token decoder (attn_out is the self-
                                               attention; cross-attention to the text is part of
                                               resid_post)

Extraction teacher-forces a clip's own music: the clip (16 kHz, resampled to EnCodec's rate) is
encoded to codes, laid out in MusicGen's delay pattern (codebook k lags k steps) after the start
token, and the decoder reads them conditioned on the clip's description (the `prompt`). Decoder
position t >= 1 predicts from audio frame t - 1 of the first codebook: kind "code", time
(t - 1) / frame_rate; position 0 is the start token. Each clip is encoded alone (EnCodec's
convolutions would let padding reach its last frames) and sequences are right-padded (causal).

`generate` makes music from descriptions with interventions installed on decoder sites for the
whole generation: every step's activation passes through them (steering during generate()).
"""

from __future__ import annotations

import numpy as np
import soxr
import torch
from torch import nn
from transformers import AutoProcessor, MusicgenForConditionalGeneration

from affectlens.models.base import Adapter, Batch, Intervention, block_hook_point
from affectlens.models.lm import prompt_positions
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import Positions
from affectlens.models.sites import Site, SiteError

SAMPLE_RATE = 16000


class MusicgenAdapter(Adapter):
    family = "musicgen"
    sample_rate = SAMPLE_RATE
    inputs = ("audio", "text")

    def __init__(self, model: MusicgenForConditionalGeneration, model_id: str, revision: str = "",
                 device: str | None = None, *, processor=None):
        super().__init__(model, model_id, revision, str(input_device(model)) if device is None else device)
        self.processor = processor
        self.t5_blocks = model.text_encoder.encoder.block
        self.decoder_layers = model.decoder.model.decoder.layers
        self.codec_sr = int(model.audio_encoder.config.sampling_rate)
        self.frame_rate = float(model.audio_encoder.config.frame_rate)
        self.num_codebooks = model.decoder.num_codebooks
        self.bos = model.generation_config.decoder_start_token_id
        if self.bos is None:
            self.bos = model.decoder.config.bos_token_id
        self.pad = model.decoder.config.pad_token_id

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None) -> "MusicgenAdapter":
        model, rev, where = load_pretrained(MusicgenForConditionalGeneration, source, revision, dtype, device,
                                            device_map)
        return cls(model, source, rev, processor=load_processor(AutoProcessor, where, revision))

    @property
    def n_blocks(self) -> dict[str, int]:
        return {"text": len(self.t5_blocks), "decoder": len(self.decoder_layers)}

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower == "text":  # T5 encoder blocks: layer[0] self-attention, layer[1] feed-forward
            return block_hook_point(self.t5_blocks, site, attn="layer.0.SelfAttention", mlp="layer.1.DenseReluDense")
        if site.tower == "decoder":
            return block_hook_point(self.decoder_layers, site, mlp="fc2")
        raise SiteError(f"site {site}: MusicGen has the towers 'text' and 'decoder'")

    def _text(self, texts: list[str]) -> tuple[dict, list[Positions]]:
        tok = self.processor.tokenizer
        tok.padding_side = "right"
        enc = tok(list(texts), padding=True, return_tensors="pt")
        positions = [prompt_positions(ids, mask, tok.convert_ids_to_tokens(ids.tolist()), {})
                     for ids, mask in zip(enc["input_ids"].numpy(), enc["attention_mask"].numpy())]
        return {k: v.to(self.device) for k, v in enc.items()}, positions

    def codes(self, wave: np.ndarray) -> torch.Tensor:
        """One 16 kHz clip -> EnCodec codes [codebook, frame]."""
        x = soxr.resample(np.asarray(wave, dtype=np.float32), SAMPLE_RATE, self.codec_sr, quality="HQ")
        values = torch.from_numpy(x.astype(np.float32))[None, None].to(self.device, next(self.model.parameters()).dtype)
        with torch.inference_mode():
            out = self.model.audio_encoder.encode(values, bandwidth=None)
        return out.audio_codes[0, 0]

    def delayed(self, codes: torch.Tensor) -> torch.Tensor:
        """[codebook, frame] -> decoder input [codebook, 1 + frame + codebook - 1]: the start token,
        then codebook k delayed by k steps (start tokens before, padding after)."""
        k, t = codes.shape
        out = torch.full((k, t + k), self.pad, dtype=torch.long, device=codes.device)
        for i in range(k):
            out[i, :i + 1] = self.bos
            out[i, i + 1:i + 1 + t] = codes[i]
        return out

    def prepare(self, clips: list[dict]) -> Batch:
        if self.processor is None:
            raise ValueError(f"{self.model_id}: no processor; pass one to MusicgenAdapter")
        text, text_pos = self._text([c.get("text") or "" for c in clips])
        seqs = [self.delayed(self.codes(c["audio"])) for c in clips]
        width = max(s.shape[1] for s in seqs)
        ids = torch.full((len(seqs), self.num_codebooks, width), self.pad, dtype=torch.long, device=self.device)
        dec_pos = []
        for i, s in enumerate(seqs):
            ids[i, :, :s.shape[1]] = s
            n = s.shape[1]
            time = np.r_[np.nan, np.arange(n - 1) / self.frame_rate]
            dec_pos.append(Positions(np.arange(n), np.full(n, "code", dtype=object), time, np.full(n, -1),
                                     np.array(["<bos>"] + [""] * (n - 1), dtype=object)))
        inputs = {**text, "decoder_input_ids": ids.reshape(len(seqs) * self.num_codebooks, width)}
        return Batch(inputs, [len(p) for p in dec_pos], {"family": self.family},
                     {"text": text_pos, "decoder": dec_pos})

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [clip * codebook, position, code]."""
        return self.model(**batch.inputs, use_cache=False).logits

    @torch.inference_mode()
    def generate(self, texts: list[str], interventions: dict[str, Intervention] | None = None,
                 max_new_tokens: int = 256, **generate_kwargs) -> torch.Tensor:
        """Music for each description [clip, channel, sample] at the codec's rate, with
        `interventions` on decoder (or text) sites for every step of the generation. With
        classifier-free guidance (guidance_scale > 1) the unconditional half passes through them too."""
        text, _ = self._text(texts)
        with self.hooks(interventions or {}):
            return self.model.generate(**text, max_new_tokens=max_new_tokens, **generate_kwargs)
