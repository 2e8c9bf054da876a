# Activations of every configured site. A model with `shards: N` is extracted as N jobs over
# consecutive clip ranges (rule extract_shard, one GPU job each), which rule extract merges into
# one store and verifies; with one shard, rule extract runs the model itself. A local model
# folder's weight files are inputs: replacing them reruns extraction and everything downstream.


rule extract_shard:
    input:
        manifest=rules.decode.output.manifest,
        weights=model_weights,
    output:
        store="results/extract_shard/{dataset}/{model}/{shard}.h5",
    log:
        "logs/extract_shard/{dataset}/{model}/{shard}.log",
    benchmark:
        "benchmarks/extract_shard/{dataset}/{model}/{shard}.tsv"
    wildcard_constraints:
        shard="[0-9]+-of-[0-9]+",
    # each retry asks for more memory (mem_by_attempt: 8, 16, 24 GB)
    retries: 2
    conda:
        "../../envs/extract.yaml"
    threads: 2
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
        weights=model_weights,
        shards=extract_shards,
    output:
        store="results/extract/{dataset}/{model}.h5",
    log:
        "logs/extract/{dataset}/{model}.log",
    benchmark:
        "benchmarks/extract/{dataset}/{model}.tsv"
    retries: 2
    conda:
        "../../envs/extract.yaml"
    threads: 2
    resources:
        gpu=extract_gpus,
        mem_mb=mem_by_attempt(8000),
        runtime=240,
    params:
        model=model_cfg,
    script:
        "../scripts/extract.py"
