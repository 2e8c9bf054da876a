import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.sae.sae(snakemake.input.store, snakemake.input.manifest, snakemake.wildcards.site, snakemake.params.sae,
               snakemake.params.label_column, snakemake.output[0], model_cfg=snakemake.params.model,
               checkpoint=snakemake.params.checkpoint)
