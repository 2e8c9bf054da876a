rule raw:
    output:
        directory("resources/raw/{dataset}"),
    log:
        "logs/raw/{dataset}.log",
    # A retry resumes the download from the cache (download_dir), which a failed job leaves in place.
    retries: 2
    conda:
        "../../envs/data.yaml"
    threads: 1
    params:
        dataset=dataset_cfg,
        # the user's own files, listed when the workflow is planned: a changed folder or table
        # reruns this dataset's jobs (and nothing else)
        data=dataset_listing,
    script:
        "../scripts/raw.py"


rule manifest:
    input:
        raw=rules.raw.output,
    output:
        manifest="results/manifest/{dataset}.tsv",
        rejected="results/manifest/{dataset}.rejected.tsv",
    log:
        # a copy of the reasons kept when the job fails (Snakemake deletes a failed job's outputs)
        log="logs/manifest/{dataset}.log",
        rejected="logs/manifest/{dataset}.rejected.tsv",
    conda:
        "../../envs/data.yaml"
    params:
        dataset=dataset_cfg,
    script:
        "../scripts/manifest.py"


rule decode:
    input:
        manifest=rules.manifest.output.manifest,
    output:
        audio=directory("results/decode/{dataset}/audio"),
        frames=directory("results/decode/{dataset}/frames"),
        manifest="results/decode/{dataset}/manifest.tsv",
        rejected="results/decode/{dataset}/rejected.tsv",
    log:
        log="logs/decode/{dataset}.log",
        rejected="logs/decode/{dataset}.rejected.tsv",
    conda:
        "../../envs/data.yaml"
    threads: 2
    params:
        dataset=dataset_cfg,
    script:
        "../scripts/decode.py"


# PMEmo and DEAM only (requested through probe_dynamic): the 2 Hz valence/arousal curves of the
# manifest's clips, times from each clip's start, beside the manifest. A small table, like the
# manifest: made on the submitting host, where the raw files are.
rule dynamic_ratings:
    input:
        raw=rules.raw.output,
        manifest=rules.manifest.output.manifest,
    output:
        ratings="results/dynamic_ratings/{dataset}.tsv",
    log:
        "logs/dynamic_ratings/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    params:
        dataset=dataset_cfg,
    script:
        "../scripts/dynamic_ratings.py"
