import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    w, p = snakemake.wildcards, snakemake.params
    stages.transfer.transfer(p.datasets, list(snakemake.input.stores), list(snakemake.input.manifests),
                             list(snakemake.input.get("acoustic", [])) or None, p.probe, p.transfer, p.contrasts,
                             dict(snakemake.output.items()), title=f"{w.study}: {w.model}", threads=snakemake.threads)
