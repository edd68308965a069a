# Settings (validated against facelora.config's schema) and helpers shared by all rules.
# Every path comes from the results layout (facelora.registry.layout, `L`); every rule's
# settings trigger is what its command declares it reads (facelora.workflow.cli).
from facelora.registry.families import FAMILY_NAMES
from facelora.registry.layout import Layout
from facelora.workflow.rules import (
    all_eval_group_outputs,
    command_settings,
    eval_group_outputs,
    existing,
    folder,
    job_resources,
    list_raw,
    load_workflow_params,
    previous_training,
    put_cli_on_path,
    raw_folder,
    synthesis_kinds,
    train_processes,
)


configfile: "params.yaml"


P = load_workflow_params(config)
put_cli_on_path()
RAW = raw_folder(P)
L = Layout(P.paths.results)
SHARDS = list(range(P.workflow.shards))
N_SHARDS = P.workflow.shards
# one listing of paths.raw per shard: the detect jobs' inputs (not every photo)
list_raw(P, L, in_job=not workflow.is_main_process)
PHASES = P.phase_names
KINDS = P.synthesis.kinds
MADE = [L.synthesis_dir(kind) for kind in KINDS]
ENV = "../environment.yml"
# the report's categories (`snakemake --report`), in the recipe's order
DATA, TRAINING, EVALUATION, MODEL = (
    "1. Data",
    "2. Training",
    "3. Evaluation",
    "4. Model",
)
