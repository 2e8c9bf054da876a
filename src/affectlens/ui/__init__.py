"""`affectlens ui RESULTS_DIR`: a local web UI over a finished results folder of the workflow.

`index.index_results` reads the folder into studies, runs (dataset × model), figures, tables and
the steered audio's α grid; `files` serves files from inside the folder only; `app` builds the
Dash page. Dash is the optional extra `ui` (`pip install -e ".[ui]"`)."""
