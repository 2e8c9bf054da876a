import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    out = snakemake.output
    stages.probe.probe_dynamic(snakemake.input.store, snakemake.input.manifest, snakemake.input.ratings,
                         snakemake.params.settings, out.table, out.predictions, out.plot,
                         alphas=snakemake.params.alphas, threads=snakemake.threads)
