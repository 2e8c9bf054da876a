import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0]):
    stages.patch.heatmaps(snakemake.params.summaries, snakemake.output[0])
