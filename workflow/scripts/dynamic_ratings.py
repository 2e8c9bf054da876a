import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0]):
    stages.data.dynamic_ratings(snakemake.input.raw[0], snakemake.input.manifest, snakemake.wildcards.dataset,
                           snakemake.params.dataset, snakemake.output.ratings)
