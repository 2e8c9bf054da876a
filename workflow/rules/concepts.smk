# A concept given by two folders of recordings (config `concepts:`), looked up among the features
# of the SAE that rule sae trains at the concept's site: the clips are extracted by the model that
# made the SAE's training store (same settings and storage dtype), encoded by the SAE, and every
# feature is ranked and tested.


rule concepts:
    input:
        unpack(concept_inputs),
    output:
        report(
            directory("results/concepts/{concept}"),
            patterns=["{file}.png", "{file}.html"],  # features.png, dashboard.html
            caption="../report/concepts.rst",
            category="Concepts",
            labels={"concept": "{concept}", "figure": "{file}"},
        ),
    log:
        "logs/concepts/{concept}.log",
    benchmark:
        "benchmarks/concepts/{concept}.tsv"
    wildcard_constraints:
        concept="[A-Za-z0-9_-]+",
    retries: 2
    conda:
        "../../envs/steer.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_by_attempt(6000),
        runtime=120,
    params:
        concept=lambda wildcards: config["concepts"][wildcards.concept],
        model=concept_model,
        site=concept_site,
    script:
        "../scripts/concepts.py"
