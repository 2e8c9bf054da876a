import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0]):
    stages.data.manifest(snakemake.input.raw[0], snakemake.wildcards.dataset, snakemake.params.dataset,
                    snakemake.output.manifest, snakemake.output.rejected,
                    kept_rejected=snakemake.log.rejected)
