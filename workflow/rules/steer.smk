rule steer:
    input:
        unpack(steer_inputs),
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
    output:
        report(
            directory("results/steer/{dataset}/{model}/{contrast}"),
            patterns=["{plot}.png"],  # dose_response.png, the only figure there
            caption="../report/dose_response.rst",
            category="Steering",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "contrast": "{contrast}",
                "figure": "dose response",
            },
        ),
    log:
        "logs/steer/{dataset}/{model}/{contrast}.log",
    benchmark:
        "benchmarks/steer/{dataset}/{model}/{contrast}.tsv"
    retries: 2
    conda:
        "../../envs/steer.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_by_attempt(8000),
        runtime=180,
    params:
        model=model_cfg,
        contrast=contrast_of,
        steer=config["steer"],
        judge_models=judge_models,
        label_column=lambda w: config["datasets"][w.dataset]["label_column"],
    script:
        "../scripts/steer.py"
