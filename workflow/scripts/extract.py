import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.extract.extract(snakemake.input.manifest, snakemake.params.model, snakemake.output.store,
                   shard=snakemake.wildcards.get("shard"), shard_stores=list(snakemake.input.get("shards", [])))
