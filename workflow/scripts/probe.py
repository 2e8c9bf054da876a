import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    out = snakemake.output
    stages.probe.probe(snakemake.input.store, snakemake.input.manifest, snakemake.params.probe,
                 snakemake.params.label_column, out.sweep, out.confusion, out.curve, threads=snakemake.threads,
                 pairs=snakemake.params.pairs, readout_site=snakemake.params.readout_site,
                 acoustic=snakemake.input.acoustic or None, out_folds=out.folds,
                 out_representation=out.representation, out_confusion_plot=out.confusion_plot,
                 out_projection=out.projection, out_time_resolved=out.time_resolved, out_time_curve=out.time_curve)
