rule sae:
    input:
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
    output:
        report(
            directory("results/sae/{dataset}/{model}/{site}"),
            patterns=["{page}.html"],  # dashboard.html, the only page there
            caption="../report/sae_dashboard.rst",
            category="Sparse autoencoders",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "site": "{site}",
                "figure": "feature dashboard",
            },
        ),
    log:
        "logs/sae/{dataset}/{model}/{site}.log",
    benchmark:
        "benchmarks/sae/{dataset}/{model}/{site}.tsv"
    retries: 2
    conda:
        "../../envs/steer.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_by_attempt(6000),
        runtime=240,
    params:
        sae=config["sae"],
        label_column=label_column,
        model=model_cfg,
        # outside the output folder, which Snakemake deletes when a job fails
        checkpoint="results/sae/{dataset}/{model}/.checkpoints/{site}.pt",
    script:
        "../scripts/sae.py"
