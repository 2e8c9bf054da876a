import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0]):
    stages.probe.concat_sweeps(list(snakemake.input), snakemake.output.table, study=snakemake.wildcards.study)
