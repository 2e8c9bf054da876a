# Config validation and every input function of the workflow. Rules name each other's files with
# `rules.X.output`; these functions spell paths out, since a storage-flagged `rules.X.output` (a
# --default-storage-provider run) cannot be formatted here.
import yaml
from snakemake.utils import validate

from affectlens.models.sites import SITE_PATTERN
from affectlens.config import check_config, contrast_name, sae_steer_site
from affectlens.extract import shard_paths, weight_files

validate(config, "../schemas/config.schema.yaml")
check_config(config)


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_.-]+",
    contrast="[A-Za-z0-9_]+-to-[A-Za-z0-9_]+",
    site=SITE_PATTERN,


def study_combos():
    """(study, dataset, model) for every configured study."""
    for study, s in config["studies"].items():
        for dataset in s["datasets"]:
            for model in s["models"]:
                yield study, dataset, model


def patch_summaries():
    """{study: [summary.tsv, ...]} for every study x dataset x model x contrast."""
    out = {}
    for study, dataset, model in study_combos():
        for c in config["studies"][study]["contrasts"]:
            out.setdefault(study, []).append(
                f"results/patch/{dataset}/{model}/{contrast_name(c)}/summary.tsv"
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
    """mem_mb that grows with each attempt of a retried job (`retries:`): mb, 2 mb, 3 mb, ..."""
    return lambda wildcards, attempt: mb * attempt


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
            targets.append(f"results/probe/{dataset}/{model}/dynamic.tsv")
        targets += [f"results/sae/{dataset}/{model}/{site}" for site in m["sae_sites"]]
        # wherever patching runs: which clips' decisions flip, read off their activations
        targets += [
            f"results/probe/{dataset}/{model}/outcomes/{contrast_name(c)}.tsv"
            for c in config["studies"][study]["contrasts"]
        ]
        if m["steer_site"]:
            for c in config["studies"][study]["contrasts"]:
                targets += [
                    f"results/steer/{dataset}/{model}/{contrast_name(c)}",
                    f"results/report/steer/{dataset}/{model}/{contrast_name(c)}.html",
                ]
    return list(dict.fromkeys(targets))


DATASET_SOURCES = set(
    yaml.safe_load(open(workflow.source_path("../schemas/config.schema.yaml")))[
        "properties"
    ]["datasets"]["additionalProperties"]["properties"]["source"]["enum"]
)


def dataset_cfg(wildcards):
    """The dataset's settings without the (defaulted) sections of other sources, so that a
    change to one source's settings never reruns datasets of another."""
    d = config["datasets"][wildcards.dataset]
    return {k: v for k, v in d.items() if k not in DATASET_SOURCES or k == d["source"]}


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


def study_sweeps(wildcards):
    """The sweep tables of every dataset x model of a study."""
    s = config["studies"][wildcards.study]
    return [
        f"results/probe/{d}/{m}/sweep.tsv" for d in s["datasets"] for m in s["models"]
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
