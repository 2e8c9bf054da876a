rule acoustic_features:
    input:
        manifest=rules.decode.output.manifest,
    output:
        features="results/acoustic_features/{dataset}.tsv",
    log:
        "logs/acoustic_features/{dataset}.log",
    conda:
        "../../envs/steer.yaml"
    threads: 2
    script:
        "../scripts/acoustic_features.py"


rule probe:
    input:
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
        acoustic=acoustic_table,
    output:
        sweep="results/probe/{dataset}/{model}/sweep.tsv",
        confusion="results/probe/{dataset}/{model}/confusion.tsv",
        folds="results/probe/{dataset}/{model}/folds.tsv",
        representation="results/probe/{dataset}/{model}/representation.tsv",
        time_resolved="results/probe/{dataset}/{model}/time_resolved.tsv",
        curve=report(
            "results/probe/{dataset}/{model}/layer_curve.png",
            caption="../report/layer_curve.rst",
            category="Probes",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "figure": "layer curve",
            },
        ),
        confusion_plot=report(
            "results/probe/{dataset}/{model}/confusion.png",
            caption="../report/confusion.rst",
            category="Probes",
            subcategory=study_of,
            labels={"dataset": "{dataset}", "model": "{model}", "figure": "confusion"},
        ),
        projection=report(
            "results/probe/{dataset}/{model}/projection.png",
            caption="../report/projection.rst",
            category="Probes",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "figure": "projection",
            },
        ),
        time_curve=report(
            "results/probe/{dataset}/{model}/time_curve.png",
            caption="../report/time_curve.rst",
            category="Probes",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "figure": "time-resolved curve",
            },
        ),
    log:
        "logs/probe/{dataset}/{model}.log",
    retries: 1
    conda:
        "../../envs/probe.yaml"
    threads: 2
    resources:
        mem_mb=mem_by_attempt(4000),
        runtime=120,
    params:
        probe=config["probe"],
        label_column=label_column,
        pairs=study_pairs,
        readout_site=readout_site,
    script:
        "../scripts/probe.py"


# In `all` wherever patching runs: which clips' decisions flip when a site is patched, read off their
# activations before patching (a `skipped` row with its reason where too few pairs were patched).
rule probe_outcomes:
    input:
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
        pairs=rules.patch.output.pairs,
        effects=rules.patch.output.effects,
    output:
        sweep="results/probe_outcomes/{dataset}/{model}/{contrast}.tsv",
    log:
        "logs/probe_outcomes/{dataset}/{model}/{contrast}.log",
    conda:
        "../../envs/probe.yaml"
    threads: 2
    params:
        probe=config["probe"],
    script:
        "../scripts/probe_outcomes.py"


# On demand, as `trace` is (GPU-sized, so in no `all`); requesting this file runs trace with it, and
# extract of every question of the dataset with the traced model, so it is the target to ask for a
# video QA trace by:  snakemake results/probe_trace_outcomes/{dataset}/{model}.tsv
# Per counterfactual x LM site, which questions' answers flip when that site is patched, read off
# the questions' activations before patching (the store), folds grouped by video; a `skipped` row
# with its reason where too few questions flip or hold.
rule probe_trace_outcomes:
    input:
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
        pairs=rules.trace.output.pairs,
        table=rules.trace.output.table,
    output:
        sweep="results/probe_trace_outcomes/{dataset}/{model}.tsv",
    log:
        "logs/probe_trace_outcomes/{dataset}/{model}.log",
    conda:
        "../../envs/probe.yaml"
    threads: 2
    params:
        probe=config["probe"],
    script:
        "../scripts/probe_trace_outcomes.py"


# On demand: one tidy table per study (every dataset x model of the study, one row per
# site x probe x split x metric).
rule probe_study:
    input:
        study_sweeps,
    output:
        table="results/probe_study/{study}.tsv",
    log:
        "logs/probe_study/{study}.log",
    wildcard_constraints:
        study="[A-Za-z0-9_-]+",
    conda:
        "../../envs/probe.yaml"
    script:
        "../scripts/probe_study.py"


# PMEmo and DEAM (requested by `all` for datasets of those sources): regression probes of the 2 Hz
# valence/arousal ratings per 0.5 s window at every site, next to the acoustic baseline.
rule probe_dynamic:
    input:
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
        ratings=rules.dynamic_ratings.output.ratings,
    output:
        table="results/probe_dynamic/{dataset}/{model}/sweep.tsv",
        predictions="results/probe_dynamic/{dataset}/{model}/predictions.tsv",
        plot=report(
            "results/probe_dynamic/{dataset}/{model}/dynamic.png",
            caption="../report/probe_dynamic.rst",
            category="Probes",
            subcategory=study_of,
            labels={
                "dataset": "{dataset}",
                "model": "{model}",
                "figure": "dynamic valence/arousal",
            },
        ),
    log:
        "logs/probe_dynamic/{dataset}/{model}.log",
    retries: 1
    conda:
        # librosa for the acoustic baseline's window features
        "../../envs/steer.yaml"
    threads: 2
    resources:
        mem_mb=mem_by_attempt(4000),
        runtime=120,
    params:
        settings=config["probe_dynamic"],
        alphas=config["probe"]["ridge_alphas"],
    script:
        "../scripts/probe_dynamic.py"
