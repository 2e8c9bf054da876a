# Config validation and every input function of the workflow. Rules name each other's files with
# `rules.X.output`; these functions spell paths out, since a storage-flagged `rules.X.output` (a
# --default-storage-provider run) cannot be formatted here.
import sys

import yaml
from snakemake.io import apply_wildcards
from snakemake.utils import validate

from affectlens import faults
from affectlens.models.sites import SITE_PATTERN
from affectlens.config import (
    LABEL_PATTERN,
    canonical,
    check_config,
    concept_sae,
    contrast_name,
    sae_steer_site,
    transfer_studies,
)
from affectlens.data.concepts import audio_files
from affectlens.data.sources import data_listing, known_labels, text_only
from affectlens.extract import shard_paths, weight_files

SCHEMA = yaml.safe_load(open(workflow.source_path("../schemas/config.schema.yaml")))
validate(config, "../schemas/config.schema.yaml")
# The datasets' own files (folders, tables) are read in the main process only: a cluster job's
# own Snakemake may not see the same paths, and the main process checked them. (A model's depth is
# read from its config.json where there is one, and not checked where there is none.)
check_config(config, known_labels if workflow.is_main_process else None)
# One key order for the settings: rule params are compared by their repr, so reordering keys in a
# config file reruns nothing (named entries keep their order, the order results are listed in).
config.update(canonical(config, SCHEMA))

if workflow.is_main_process:
    faults.reset()  # a new run: no job's earlier attempts count (see mem_by_attempt)


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    contrast=f"{LABEL_PATTERN}-to-{LABEL_PATTERN}",
    site=SITE_PATTERN,


def study_combos():
    """(study, dataset, model) for every configured study."""
    for study, s in config["studies"].items():
        for dataset in s["datasets"]:
            for model in s["models"]:
                yield study, dataset, model


def patch_summaries():
    """{study: [{dataset, model, contrast, summary: path}, ...]} for every study x dataset x
    model x contrast: the one place the patch summary's path is made (heatmaps reads the parts).
    """
    out = {}
    for study, dataset, model in study_combos():
        for c in config["studies"][study]["contrasts"]:
            contrast = contrast_name(c)
            out.setdefault(study, []).append(
                {
                    "dataset": dataset,
                    "model": model,
                    "contrast": contrast,
                    "summary": f"results/patch/{dataset}/{model}/{contrast}/summary.tsv",
                }
            )
    return out


def study_of(wildcards):
    """The report's subcategory of a dataset x model result: the studies it belongs to."""
    return ", ".join(
        sorted(
            {
                s
                for s, d, m in study_combos()
                if d == wildcards.dataset and m == wildcards.model
            }
        )
    )


def mem_by_attempt(mb):
    """mem_mb of a retried job (`retries:`): mb, then mb x attempt after an attempt that ran out of
    memory or was killed without a word; after an error a retry cannot fix (the attempt's record,
    affectlens.faults) the retry asks for mb again and stops at once."""

    def mem_mb(wildcards, attempt, rulename):
        log = apply_wildcards(str(workflow.get_rule(rulename).log[0]), wildcards)
        return faults.mem_mb(mb, attempt, log)

    return mem_mb


def benchmark_files():
    """Every benchmark file of the heavy (GPU) jobs of `all`: extract (and its shards), sae, patch, steer."""
    files = []
    for study, dataset, model in study_combos():
        m = config["models"][model]
        files.append(f"benchmarks/extract/{dataset}/{model}.tsv")
        n = m["shards"]
        files += [
            f"benchmarks/extract_shard/{dataset}/{model}/{i}-of-{n}.tsv"
            for i in range(n)
            if n > 1
        ]
        files += [
            f"benchmarks/sae/{dataset}/{model}/{site}.tsv" for site in m["sae_sites"]
        ]
        for c in config["studies"][study]["contrasts"]:
            files.append(f"benchmarks/patch/{dataset}/{model}/{contrast_name(c)}.tsv")
            if m["steer_site"]:
                files.append(
                    f"benchmarks/steer/{dataset}/{model}/{contrast_name(c)}.tsv"
                )
    files += [f"benchmarks/concepts/{name}.tsv" for name in config["concepts"]]
    return list(dict.fromkeys(files))


def all_targets():
    targets = ["results/heatmaps", "results/benchmarks/summary.tsv"]
    for study, dataset, model in study_combos():
        m = config["models"][model]
        targets.append(f"results/probe/{dataset}/{model}/sweep.tsv")
        if config["datasets"][dataset]["source"] in (
            "pmemo",
            "deam",
        ):  # sources with 2 Hz ratings
            targets.append(f"results/probe_dynamic/{dataset}/{model}/sweep.tsv")
        targets += [f"results/sae/{dataset}/{model}/{site}" for site in m["sae_sites"]]
        # wherever patching runs: which clips' decisions flip, read off their activations
        targets += [
            f"results/probe_outcomes/{dataset}/{model}/{contrast_name(c)}.tsv"
            for c in config["studies"][study]["contrasts"]
        ]
        if m["steer_site"]:
            for c in config["studies"][study]["contrasts"]:
                targets += [
                    f"results/steer/{dataset}/{model}/{contrast_name(c)}",
                    f"results/steer_listen/{dataset}/{model}/{contrast_name(c)}.html",
                ]
    targets += [f"results/concepts/{name}" for name in config["concepts"]]
    for study, why in transfer_studies(config, known_labels).items():
        if why:
            print(
                f"affectlens: no transfer stage for study {study}: {why}",
                file=sys.stderr,
            )
            continue
        targets += [
            f"results/transfer/{study}/{model}/transfer.tsv"
            for model in config["studies"][study]["models"]
        ]
    return list(dict.fromkeys(targets))


DATASET_SOURCES = set(
    SCHEMA["properties"]["datasets"]["additionalProperties"]["properties"]["source"][
        "enum"
    ]
)


# Dataset keys that only the transfer stage reads: changing them reruns no data rule.
TRANSFER_ONLY_KEYS = {"label_map"}


def dataset_cfg(wildcards):
    """The dataset's settings without the (defaulted) sections of other sources, so that a
    change to one source's settings never reruns datasets of another, and without the keys only
    the transfer stage reads."""
    d = config["datasets"][wildcards.dataset]
    return {
        k: v
        for k, v in d.items()
        if (k not in DATASET_SOURCES or k == d["source"])
        and k not in TRANSFER_ONLY_KEYS
    }


def dataset_listing(wildcards):
    """A one-line listing of the dataset's own files (a folder's recordings, a table; empty for the
    corpora pinned by checksums): rule raw's parameter, so changed data reruns that dataset only.
    """
    return data_listing(wildcards.dataset, config["datasets"][wildcards.dataset])


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def label_column(wildcards):
    return config["datasets"][wildcards.dataset]["label_column"]


def readout_site(wildcards):
    """The model's configured readout site (None: the stage applies models.config.readout_site)."""
    return config["models"][wildcards.model].get("readout_site")


def model_weights(wildcards):
    """A local model folder's weight files, read in place, never through a storage provider
    (--default-storage-provider): replacing them reruns extraction and what depends on it.
    """
    return [local(f) for f in weight_files(config["models"][wildcards.model]["source"])]


def extract_shards(wildcards):
    """The shard stores rule extract merges (none for a model with one shard)."""
    return shard_paths(
        wildcards.dataset, wildcards.model, config["models"][wildcards.model]["shards"]
    )


def extract_gpus(wildcards):
    """With shards the GPU work is in extract_shard; rule extract then only merges their stores."""
    return 0 if config["models"][wildcards.model]["shards"] > 1 else 1


def study_pairs(wildcards):
    """[source, target] of every contrast of the studies that cross this dataset and model: each
    gets a binary probe."""
    return [
        [c["source"], c["target"]]
        for s in config["studies"].values()
        if wildcards.dataset in s["datasets"] and wildcards.model in s["models"]
        for c in s.get("contrasts", [])
    ]


def acoustic_table(wildcards):
    """The dataset's acoustic feature table, which the probe stage compares the model with
    (probe.acoustic_baseline); none for a dataset whose clips are texts alone (no audio).
    """
    d = config["datasets"][wildcards.dataset]
    if not config["probe"]["acoustic_baseline"] or text_only(wildcards.dataset, d):
        return []
    return f"results/acoustic_features/{wildcards.dataset}.tsv"


def study_sweeps(wildcards):
    """The sweep tables of every dataset x model of a study."""
    s = config["studies"][wildcards.study]
    return [
        f"results/probe/{d}/{m}/sweep.tsv" for d in s["datasets"] for m in s["models"]
    ]


def transfer_inputs(wildcards):
    """The stores, decoded manifests and (probe.acoustic_baseline) acoustic feature tables of every
    dataset of the study, in the study's order, for the study's model."""
    s = config["studies"][wildcards.study]
    if wildcards.model not in s["models"]:
        raise ValueError(
            f"results/transfer/{wildcards.study}/{wildcards.model}: studies.{wildcards.study}.models "
            f"does not list {wildcards.model!r} ({s['models']})"
        )
    names = s["datasets"]
    out = {
        "stores": [f"results/extract/{d}/{wildcards.model}.h5" for d in names],
        "manifests": [f"results/decode/{d}/manifest.tsv" for d in names],
    }
    if config["probe"]["acoustic_baseline"]:
        out["acoustic"] = [f"results/acoustic_features/{d}.tsv" for d in names]
    return out


def transfer_datasets(wildcards):
    """[{name, label_column, label_map}] of the study's datasets, in the order of transfer_inputs."""
    return [
        {
            "name": d,
            "label_column": config["datasets"][d]["label_column"],
            "label_map": config["datasets"][d]["label_map"],
        }
        for d in config["studies"][wildcards.study]["datasets"]
    ]


def steer_inputs(wildcards):
    """The SAE at the steer site, for the steering method `sae` (config.py checks it is trained),
    and the stores of the judge models (steer.judge_models) on the same dataset."""
    site = sae_steer_site(config, config["models"][wildcards.model])
    out = (
        {"sae": f"results/sae/{wildcards.dataset}/{wildcards.model}/{site}"}
        if site
        else {}
    )
    for name in judge_models(wildcards):
        out[f"judge_{name}"] = f"results/extract/{wildcards.dataset}/{name}.h5"
    return out


def judge_models(wildcards):
    """{name: model config} of steer.judge_models, less the steered model itself."""
    return {
        n: config["models"][n]
        for n in config["steer"]["judge_models"]
        if n != wildcards.model
    }


def contrast_of(wildcards):
    source, target = wildcards.contrast.split("-to-")
    return {"source": source, "target": target}


def concept_inputs(wildcards):
    """The SAE a concept is read with (config.concept_sae) and the recordings of its two folders:
    adding, removing or replacing a recording reruns the concept."""
    c = config["concepts"][wildcards.concept]
    dataset, model, site = concept_sae(config, wildcards.concept)
    key = f"concepts.{wildcards.concept}"
    return {
        "sae": f"results/sae/{dataset}/{model}/{site}",
        "with_concept": [
            local(str(f)) for f in audio_files(c["with_concept"], f"{key}.with_concept")
        ],
        "without_concept": [
            local(str(f))
            for f in audio_files(c["without_concept"], f"{key}.without_concept")
        ],
    }


def concept_model(wildcards):
    """The model entry of the concept's model."""
    return config["models"][concept_sae(config, wildcards.concept)[1]]


def concept_site(wildcards):
    return concept_sae(config, wildcards.concept)[2]
