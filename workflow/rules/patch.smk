rule patch:
    input:
        store=rules.extract.output.store,
        manifest=rules.decode.output.manifest,
    output:
        pairs="results/patch/{dataset}/{model}/{contrast}/pairs.tsv",
        effects="results/patch/{dataset}/{model}/{contrast}/effects.tsv",
        summary="results/patch/{dataset}/{model}/{contrast}/summary.tsv",
        agreement="results/patch/{dataset}/{model}/{contrast}/agreement.tsv",
        # head-level patching of attn_heads sites (`patch.heads`); without rows when none are stored
        heads="results/patch/{dataset}/{model}/{contrast}/heads.tsv",
        heads_summary="results/patch/{dataset}/{model}/{contrast}/heads_summary.tsv",
    log:
        "logs/patch/{dataset}/{model}/{contrast}.log",
    benchmark:
        "benchmarks/patch/{dataset}/{model}/{contrast}.tsv"
    retries: 2
    conda:
        "../../envs/patch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_by_attempt(8000),
        runtime=180,
    params:
        model=model_cfg,
        contrast=contrast_of,
        patch=config["patch"],
        label_column=label_column,
    script:
        "../scripts/patch.py"


rule heatmaps:
    input:
        [item["summary"] for items in patch_summaries().values() for item in items],
    output:
        report(
            directory("results/heatmaps"),
            patterns=["{study}/{name}.png"],
            caption="../report/heatmap.rst",
            category="Patching heatmaps",
            subcategory="{study}",
            labels={"study": "{study}", "map": "{name}"},
        ),
    log:
        "logs/heatmaps.log",
    conda:
        "../../envs/report.yaml"
    params:
        summaries=patch_summaries(),
    script:
        "../scripts/heatmaps.py"


# On demand (not in `all`), for a video_qa dataset and a qwen2-vl / qwen2.5-vl model: causal
# tracing of the model's answers over counterfactual videos, LM sites x token slices. Its pairs and
# per-question table feed rule probe_trace_outcomes (probe.smk), the target that requests both.
rule trace:
    input:
        manifest=rules.decode.output.manifest,
        weights=model_weights,  # it runs the model itself (no store): a replaced local model reruns it
    output:
        table="results/trace/{dataset}/{model}/per_question.tsv",
        pairs="results/trace/{dataset}/{model}/pairs.tsv",
        summary="results/trace/{dataset}/{model}/summary.tsv",
        heatmaps=report(
            directory("results/trace/{dataset}/{model}/heatmaps"),
            patterns=["{name}.png"],
            caption="../report/trace.rst",
            category="Video QA tracing",
            subcategory="{dataset} x {model}",
            labels={"map": "{name}"},
        ),
    log:
        "logs/trace/{dataset}/{model}.log",
    benchmark:
        "benchmarks/trace/{dataset}/{model}.tsv"
    retries: 2
    conda:
        "../../envs/patch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_by_attempt(16000),
        runtime=240,
    params:
        dataset=dataset_cfg,
        model=model_cfg,
        trace=config["trace"],
    script:
        "../scripts/trace.py"
