import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402
from affectlens.data.manifest import read_manifest  # noqa: E402
from affectlens.probes.outcomes import read_table, run_outcome_probe  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    run_outcome_probe(snakemake.input.store, read_manifest(snakemake.input.manifest),
                      read_table(snakemake.input.effects), read_table(snakemake.input.pairs),
                      snakemake.params.probe, snakemake.output.sweep, threads=snakemake.threads)
