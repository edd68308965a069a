# facelora: a folder of face photos -> phase datasets -> one LoRA per phase -> evaluated
# checkpoints -> the best of each phase -> the final LoRA.
# One rule file per stage package of src/facelora (prepare, models, train, evaluate, release);
# every rule runs one `facelora` command. Local: snakemake --cores 2; cluster: snakemake
# --profile slurm; settings: params.yaml.


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/synthesis.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/release.smk"
include: "rules/apply.smk"


rule all:
    default_target: True
    input:
        rules.prepare.input,
        rules.train_all.input,
        rules.final.output,
        rules.report_pages.output,
