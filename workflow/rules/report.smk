# What `snakemake --report report.html` shows beyond the rules' own figures (marked with report()
# in their rules): a listening page per steering run and a table of the heavy jobs' benchmarks.


rule steer_listen:
    input:
        steer=rules.steer.output[0],
        manifest=rules.decode.output.manifest,
    output:
        report(
            "results/steer_listen/{dataset}/{model}/{contrast}.html",
            caption="../report/steer_listen.rst",
            category="Steering",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "contrast": "{contrast}",
                "figure": "listen",
            },
        ),
    log:
        "logs/steer_listen/{dataset}/{model}/{contrast}.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/steer_listen.py"


rule benchmarks:
    input:
        benchmark_files(),
    output:
        table=report(
            "results/benchmarks/summary.tsv",
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"figure": "table"},
        ),
        plot=report(
            "results/benchmarks/summary.png",
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"figure": "wall time and peak memory"},
        ),
    log:
        "logs/benchmarks.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/benchmarks.py"


# Downloads (raw), small tables and plots run on the submitting host under a cluster profile;
# only the model, SAE, patching, steering, probe and audio jobs are submitted. The workflow's one
# list of local rules (a rule does not set `localrule:` itself).
localrules:
    all,
    raw,
    manifest,
    dynamic_ratings,
    probe_study,
    heatmaps,
    steer_listen,
    benchmarks,
