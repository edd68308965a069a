# facelora: a folder of face photos -> phase datasets -> one LoRA per phase -> evaluated
# checkpoints -> the best of each phase -> the final LoRA.
# Every rule runs one `facelora` command; the logic lives in src/facelora.
# Local: snakemake --cores 2    Cluster: snakemake --profile slurm    Settings: params.yaml


include: "rules/common.smk"
include: "rules/faces.smk"
include: "rules/pairs.smk"
include: "rules/phases.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.prepare.input,
        rules.train_all.input,
        rules.final.output,
