"""Stage of workflow/rules/extract.smk: extract (and merge shards)."""

from __future__ import annotations

import logging

from affectlens.models import build_adapter
from affectlens.models.config import ModelConfig

log = logging.getLogger("affectlens")


def extract(manifest_path, model_cfg: ModelConfig | dict, out_store, shard: str | None = None, shard_stores=()) -> None:
    """Every configured site over the manifest's clips into one store. With `shard` ("i-of-n",
    0-based) only that slice of clips; with `shard_stores` nothing is run: the shards are merged
    (refusing gaps, overlaps and shards made with other settings) and the merge is verified."""
    from affectlens.data.decode import decode_clip
    from affectlens.data.manifest import read_manifest
    from affectlens.naming import parse_shard
    from affectlens.extract import clip_loader, extract_store, shard_range
    from affectlens.store import merge_stores

    if shard_stores:
        merge_stores(list(shard_stores), out_store, require_all=True)
        log.info("merged %d shards into %s", len(shard_stores), out_store)
        return
    manifest = read_manifest(manifest_path)
    clip_range = None
    if shard is not None:
        i, n = parse_shard(shard)
        clip_range = shard_range(len(manifest), i, n)
    m = ModelConfig.from_dict(model_cfg)
    adapter = build_adapter(m)
    log.info("extracting clips %s of %d with %s (revision %s) on %s", clip_range or "all", len(manifest),
             adapter.model_id, adapter.revision, adapter.device)
    load_clip = clip_loader(adapter, decode_clip, text_column=m.text_column, prompt=m.prompt)
    extract_store(manifest, adapter, list(m.sites), out_store, load_clip=load_clip,
                  batch_size=m.batch_size, chunk_clips=m.chunk_clips,
                  storage_dtype=m.storage_dtype,
                  config=m.options() if isinstance(model_cfg, ModelConfig) else model_cfg, clip_range=clip_range)
