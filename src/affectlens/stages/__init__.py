"""One module per workflow rules file, one plain function per rule: paths and settings in, files out.

The Snakemake scripts in workflow/scripts/ only unpack `snakemake` into these functions, so tests
call exactly what the workflow calls: `stages.steer.steer(...)` is what rule steer runs.
"""

from affectlens.stages import common, concepts, data, extract, patch, probe, sae, steer, transfer  # noqa: F401
from affectlens.stages.common import logged, write_tsv  # noqa: F401
