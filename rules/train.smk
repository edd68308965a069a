# one LoRA per phase, each starting from the previous phase's (training resumes by itself)


rule train:
    input:
        data=f"{RES}/phases/{{phase}}",
        model=P.model.path,
        previous=previous_training(P, RES),
    output:
        summary=f"{RES}/train/{{phase}}/train.json",
        plot=f"{RES}/train/{{phase}}/loss.png",
    log:
        "logs/train/{phase}.log",
    wildcard_constraints:
        phase="|".join(PHASES),
    conda:
        ENV
    threads: P.resources.train.cpus
    resources:
        **job_resources(P, "train"),
    params:
        settings=settings(P, "seed", "lr", "model", "lora", "train"),
        phase=lambda w: P.phase(w.phase).model_dump(mode="json"),
        out_dir=output_parent("summary"),
        cache=f"{RES}/cache",
        processes=train_processes(P),
        nodes=P.resources.train.nodes,
    shell:
        "facelora train {wildcards.phase} --data {input.data} --out {params.out_dir}"
        " --cache {params.cache} --processes {params.processes} --nodes {params.nodes}"
        " > {log} 2>&1"


rule train_all:
    input:
        expand(f"{RES}/train/{{phase}}/train.json", phase=PHASES),
