"""Sparse autoencoders: one file per architecture (config + module), a registry keyed by
`architecture`, one training loop, pure metric functions, per-feature statistics, concept
search and sparse probing in SAE space, downstream fidelity of spliced reconstructions, and SAE
folders in our format or SAELens's (`load`, `save`, `export`; `saelens`)."""

from affectlens.sae.base import ForwardOutput, SAEConfig
from affectlens.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from affectlens.sae.formats import FORMATS, export, load, save
from affectlens.sae.features import (ClipFeatures, auroc, clip_features, encode_array, feature_stats,
                                     peak_frames, top_activating)
from affectlens.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from affectlens.sae.metrics import dead_fraction, explained_variance, l0, normalised_mse
from affectlens.sae.registry import ARCHITECTURES, architecture_of, build, load_sae, save_sae
from affectlens.sae.relu import ReLUConfig, ReLUSAE
from affectlens.sae.topk import TopKConfig, TopKSAE
from affectlens.sae.train import SparseAutoencoder, evaluate, train_sae

__all__ = [
    "ARCHITECTURES", "FORMATS", "BatchTopKConfig", "BatchTopKSAE", "ClipFeatures", "ForwardOutput", "JumpReLUConfig",
    "JumpReLUSAE", "ReLUConfig", "ReLUSAE", "SAEConfig", "SparseAutoencoder", "TopKConfig", "TopKSAE",
    "architecture_of", "auroc", "build", "clip_features", "dead_fraction", "encode_array", "evaluate", "export",
    "explained_variance", "feature_stats", "l0", "load", "load_sae", "normalised_mse", "peak_frames", "save", "save_sae",
    "top_activating", "train_sae",
]
