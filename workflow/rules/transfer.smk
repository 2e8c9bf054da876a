# Cross-corpus transfer (in `all` for every study with two or more datasets): probes and concept axes
# fit on one dataset of the study and tested on another, every ordered pair and site, beside their
# within-corpus scores, under each of transfer.normalise.


rule transfer:
    input:
        unpack(transfer_inputs),
    output:
        table="results/transfer/{study}/{model}/transfer.tsv",
        axes="results/transfer/{study}/{model}/axes.tsv",
        labels="results/transfer/{study}/{model}/labels.tsv",
        plot=report(
            "results/transfer/{study}/{model}/transfer.png",
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{study}",
            labels={
                "study": "{study}",
                "model": "{model}",
                "figure": "transfer vs within",
            },
        ),
        axes_plot=report(
            "results/transfer/{study}/{model}/axes.png",
            caption="../report/transfer_axes.rst",
            category="Transfer",
            subcategory="{study}",
            labels={
                "study": "{study}",
                "model": "{model}",
                "figure": "axes across corpora",
            },
        ),
    log:
        "logs/transfer/{study}/{model}.log",
    wildcard_constraints:
        study="[A-Za-z0-9_-]+",
    retries: 1
    conda:
        "../../envs/probe.yaml"
    threads: 2
    resources:
        mem_mb=mem_by_attempt(4000),
        runtime=120,
    params:
        datasets=transfer_datasets,
        contrasts=lambda w: config["studies"][w.study]["contrasts"],
        probe=config["probe"],
        transfer=config["transfer"],
    script:
        "../scripts/transfer.py"
