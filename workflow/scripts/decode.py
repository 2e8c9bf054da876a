import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.data.decode(snakemake.input.manifest, snakemake.params.dataset, snakemake.output.audio, snakemake.output.frames,
                  snakemake.output.manifest, snakemake.output.rejected, threads=snakemake.threads,
                  kept_rejected=snakemake.log.rejected,
                  dataset=snakemake.wildcards.dataset)
