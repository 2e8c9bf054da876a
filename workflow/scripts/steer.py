import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

judges = snakemake.params.judge_models
with stages.logged(snakemake.log[0], snakemake.threads):
    stages.steer.steer(snakemake.input.store, snakemake.input.manifest, snakemake.params.model,
                       snakemake.params.contrast, snakemake.params.steer, snakemake.params.label_column,
                       snakemake.output[0], threads=snakemake.threads, sae_dir=getattr(snakemake.input, "sae", None),
                       judge_stores={name: snakemake.input[f"judge_{name}"] for name in judges}, judge_models=judges)
