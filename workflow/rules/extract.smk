# Activations of every configured site. A model with `shards: N` is extracted as N jobs over
# consecutive clip ranges (rule extract_shard, one GPU job each), which rule extract merges into
# one store and verifies; with one shard, rule extract runs the model itself. A local model
# folder's weight files are inputs: replacing them reruns extraction and everything downstream.
from affectlens.extract import shard_paths, weight_files


rule extract_shard:
    input:
        manifest=rules.decode.output.manifest,
        # read in place, never through a storage provider (--default-storage-provider)
        weights=lambda w: [local(f) for f in weight_files(config["models"][w.model]["source"])],
    output:
        store="results/extract_shard/{dataset}/{model}/{shard}.h5",
    log:
        "logs/extract_shard/{dataset}/{model}/{shard}.log",
    benchmark:
        "benchmarks/extract_shard/{dataset}/{model}/{shard}.tsv"
    wildcard_constraints:
        shard="[0-9]+-of-[0-9]+",
    conda:
        "../../envs/extract.yaml"
    threads: 2
    # each retry asks for more memory (mem_by_attempt: 8, 16, 24 GB)
    retries: 2
    resources:
        gpu=1,
        mem_mb=mem_by_attempt(8000),
        runtime=240,
    params:
        model=model_cfg,
    script:
        "../scripts/extract.py"


rule extract:
    input:
        manifest=rules.decode.output.manifest,
        # read in place, never through a storage provider (--default-storage-provider)
        weights=lambda w: [local(f) for f in weight_files(config["models"][w.model]["source"])],
        shards=lambda w: shard_paths(
            w.dataset, w.model, config["models"][w.model]["shards"]
        ),
    output:
        store="results/extract/{dataset}/{model}.h5",
    log:
        "logs/extract/{dataset}/{model}.log",
    benchmark:
        "benchmarks/extract/{dataset}/{model}.tsv"
    conda:
        "../../envs/extract.yaml"
    threads: 2
    retries: 2
    resources:
        # with shards the GPU work is in extract_shard; this job only merges their stores
        gpu=lambda w: 0 if config["models"][w.model]["shards"] > 1 else 1,
        mem_mb=mem_by_attempt(8000),
        runtime=240,
    params:
        model=model_cfg,
    script:
        "../scripts/extract.py"
