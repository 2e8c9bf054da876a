import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.patch.trace(snakemake.input.manifest, snakemake.params.dataset, snakemake.params.model, snakemake.params.trace,
                 snakemake.output.table, snakemake.output.pairs,
                 snakemake.output.summary, snakemake.output.heatmaps)
