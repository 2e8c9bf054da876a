import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.concepts.concepts(snakemake.input.sae, snakemake.params.model, snakemake.params.site,
                             snakemake.params.concept, snakemake.output[0], name=snakemake.wildcards.concept)
