"""Self-supervised speech encoders: wav2vec 2.0, HuBERT, WavLM and data2vec-audio, one adapter.

All four share one layout in transformers: a convolutional stem (`feature_extractor`, 20 ms
frames at 16 kHz: 50 frames/s), a projection, and `encoder.layers[L]` with `attention` and
`feed_forward`. Sites:

    encoder.embed                 input to block 0 (stem + projection + positional conv, and for
                                  post-LN models the encoder's layer norm)
    encoder.blocks.{L}.attn_out   the self-attention output, before it joins the residual
    encoder.blocks.{L}.mlp_out    the feed-forward output, before it joins the residual
    encoder.blocks.{L}.resid_post the block's output
    encoder.blocks.{L}.attn_heads the heads' outputs, the input of `attention.out_proj`
    encoder.blocks.{L}.mlp_hidden the feed-forward's hidden activation, the input of
                                  `feed_forward.output_dense`

WavLM's attention hands its output projection's weights to torch's fused attention function, so
no module call sees the heads; the adapter's forward routes it through `out_proj` as a module
(the same product, see `_wavlm_out_proj_as_module`).

Base-size checkpoints are post-LN (a layer norm follows each residual addition, so resid_post is
not resid_pre + attn_out + mlp_out); large ones are pre-LN with a final layer norm after the last
block (`forward` returns the normed output).

Padding: clips of a batch are zero-padded and the attention mask passed, so padded frames are
never attended to. Two parts of these models would still let padding reach real frames: a stem
with group norm (wav2vec2-base, HuBERT, WavLM: normalisation statistics over time) and
data2vec-audio's stack of positional convolutions (the first conv's output in the padding is not
zero, and the next ones read it). Those parts run on each clip's own frames and only the rest is
batched, so a clip's activations do not depend on what it was batched with.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Data2VecAudioModel,
    HubertModel,
    PreTrainedModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMModel,
)

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import audio_positions
from affectlens.models.sites import Site, SiteError

FAMILIES: dict[str, type[PreTrainedModel]] = {
    "wav2vec2": Wav2Vec2Model,
    "hubert": HubertModel,
    "wavlm": WavLMModel,
    "data2vec-audio": Data2VecAudioModel,
}
SAMPLE_RATE = 16000


class SpeechEncoderAdapter(Adapter):
    """wav2vec2 / HuBERT / WavLM / data2vec-audio encoders (a head model such as *ForCTC is
    accepted too: its base model is used)."""

    families = tuple(FAMILIES)
    sample_rate = SAMPLE_RATE
    inputs = ("audio",)

    def __init__(self, model: PreTrainedModel, model_id: str, revision: str = "", device: str | None = None,
                 *, family: str = "wav2vec2", feature_extractor: Wav2Vec2FeatureExtractor | None = None):
        if family not in FAMILIES:
            raise ValueError(f"speech encoder family {family!r}: choose one of {sorted(FAMILIES)}")
        base = model.base_model
        super().__init__(model, model_id, revision, str(input_device(base)) if device is None else device)
        self.family = family
        self.base = base
        self.encoder = base.encoder
        config = base.config
        self.frame_rate = SAMPLE_RATE / float(np.prod(config.conv_stride))
        # Group norm in the stem normalises over time: padding would leak into real frames.
        self.stem_per_clip = getattr(config, "feat_extract_norm", "layer") == "group"
        # Stacked positional convs (data2vec-audio) read the first conv's non-zero padding output.
        self.pos_conv_per_clip = len(getattr(self.encoder.pos_conv_embed, "layers", ())) > 1
        self.feature_extractor = feature_extractor or Wav2Vec2FeatureExtractor(
            sampling_rate=SAMPLE_RATE, do_normalize=True, return_attention_mask=True)

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None, family: str = "wav2vec2") -> "SpeechEncoderAdapter":
        if family not in FAMILIES:
            raise ValueError(f"speech encoder family {family!r}: choose one of {sorted(FAMILIES)}")
        model, rev, where = load_pretrained(FAMILIES[family], source, revision, dtype, device, device_map)
        try:
            fe = load_processor(Wav2Vec2FeatureExtractor, where, revision)
        except OSError:  # checkpoints without preprocessor_config.json: wav2vec2's defaults
            fe = None
        return cls(model, source, rev, family=family, feature_extractor=fe)

    @property
    def n_blocks(self) -> dict[str, int]:
        return {"encoder": len(self.encoder.layers)}

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower != "encoder":
            raise SiteError(f"site {site}: {self.family} has only the tower 'encoder'")
        return block_hook_point(self.encoder.layers, site, attn="attention", mlp="feed_forward")

    @property
    def receptive_field(self) -> int:
        """Samples that one frame of the conv stem sees (fewer give no frame)."""
        field, hop = 1, 1
        for k, stride in zip(self.base.config.conv_kernel, self.base.config.conv_stride):
            field, hop = field + (k - 1) * hop, hop * stride
        return field

    def frames_for(self, n_samples: int) -> int:
        """Frames of the conv stem for n_samples (no frame reaches into padding)."""
        return int(self.base._get_feat_extract_output_lengths(int(n_samples)))

    def prepare(self, waves: list[np.ndarray]) -> Batch:
        """16 kHz mono waves -> `input_values` [clip, sample] normalised per clip over its own
        samples, zero-padded to the longest, with `attention_mask`."""
        for i, w in enumerate(waves):
            if np.ndim(w) != 1 or self.frames_for(len(w)) < 1:
                raise ValueError(f"clip {i}: expected a 1-D 16 kHz wave long enough for one frame "
                                 f"({1000 * self.receptive_field / SAMPLE_RATE:.0f} ms), got shape {np.shape(w)}")
        out = self.feature_extractor([np.asarray(w, dtype=np.float32) for w in waves], sampling_rate=SAMPLE_RATE,
                                     padding="longest", return_attention_mask=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        n_frames = [self.frames_for(len(w)) for w in waves]
        return Batch({"input_values": out.input_values.to(self.device, dtype),
                      "attention_mask": out.attention_mask.to(self.device)},
                     n_frames, {"family": self.family, "n_samples": [len(w) for w in waves]},
                     {"encoder": [audio_positions(n, self.frame_rate) for n in n_frames]})

    def forward(self, batch: Batch) -> torch.Tensor:
        """Encoder output [clip, frame, d] (after the final layer norm of pre-LN models)."""
        samples = batch.meta.get("n_samples")
        per_clip = samples is not None and len(set(samples)) > 1
        with ExitStack() as stack:
            if self.family == "wavlm":
                stack.enter_context(_wavlm_out_proj_as_module(self.encoder.layers))
            if per_clip and self.stem_per_clip:  # [clip, channel, frame]
                stack.enter_context(_per_clip(self.base.feature_extractor, samples, time_axis=-1,
                                              total=lambda x: int(self.base._get_feat_extract_output_lengths(x.shape[-1]))))
            if per_clip and self.pos_conv_per_clip:  # [clip, frame, d]
                stack.enter_context(_per_clip(self.encoder.pos_conv_embed, batch.n_frames, time_axis=1,
                                              total=lambda x: x.shape[1]))
            return self.base(**batch.inputs).last_hidden_state


@contextmanager
def _per_clip(module: nn.Module, lengths: list[int], time_axis: int, total):
    """Within the block, `module` runs on each clip's first lengths[i] steps alone and its outputs
    are zero-padded back to the batch's length `total(input)` along `time_axis`."""
    run = type(module).forward

    def forward(x):
        n_out = total(x)
        outs = []
        for i, n in enumerate(lengths):
            y = run(module, x[i:i + 1].narrow(time_axis, 0, n))
            pad = [0, 0] * (y.dim() - (time_axis % y.dim()) - 1) + [0, n_out - y.shape[time_axis]]
            outs.append(F.pad(y, pad))
        return torch.cat(outs)

    module.forward = forward
    try:
        yield
    finally:
        del module.forward


@contextmanager
def _wavlm_out_proj_as_module(layers: nn.ModuleList):
    """Within the block, each WavLM attention runs torch's fused attention with an identity
    output projection (giving the heads' outputs, concatenated head-major, exactly: a product
    with the identity rounds nothing) and then calls its `out_proj` as a module on them, so hooks
    on `out_proj` (the attn_heads site) see the heads. The result is the fused call's own last
    step, the same linear on the same tensor."""
    attns = [layer.attention for layer in layers]

    def routed(attn, run):
        def fused(hidden_states, attention_mask, gated_position_bias):
            proj = attn.out_proj
            eye = torch.eye(proj.in_features, dtype=proj.weight.dtype, device=proj.weight.device)
            attn._modules["out_proj"] = _Projection(eye, None if proj.bias is None else torch.zeros_like(proj.bias))
            try:
                heads, weights = run(attn, hidden_states, attention_mask, gated_position_bias)
            finally:
                attn._modules["out_proj"] = proj
            return proj(heads), weights
        return fused

    for attn in attns:
        attn.torch_multi_head_self_attention = routed(attn, type(attn).torch_multi_head_self_attention)
    try:
        yield
    finally:
        for attn in attns:
            del attn.torch_multi_head_self_attention


class _Projection(nn.Module):
    """Weights that stand in for an output projection while the fused call reads them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias
