import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.patch.patch(snakemake.input.store, snakemake.input.manifest, snakemake.params.model, snakemake.params.contrast,
                 snakemake.params.patch, snakemake.params.label_column, snakemake.output.pairs,
                 snakemake.output.effects, snakemake.output.summary, snakemake.output.agreement,
                 snakemake.output.heads, snakemake.output.heads_summary)
