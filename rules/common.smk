# Settings (validated against facelora.config's schema) and helpers shared by all rules.
from facelora.workflow.rules import (
    eval_group_outputs,
    job_resources,
    load_workflow_params,
    output_parent,
    previous_training,
    put_cli_on_path,
    raw_folder,
    raw_images,
    raw_sidecars,
    settings,
    train_processes,
)


configfile: "params.yaml"


P = load_workflow_params(config)
put_cli_on_path()
RAW = raw_folder(P)
RES = P.paths.results
SHARDS = list(range(P.workflow.shards))
N_SHARDS = P.workflow.shards
PHASES = P.phase_names
ENV = "../environment.yml"
