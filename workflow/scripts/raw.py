import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.data.raw(snakemake.wildcards.dataset, snakemake.params.dataset, snakemake.output[0])
