# every checkpoint judged on the held-out pairs -> the best per phase -> one report


rule evaluate_base:
    input:
        validation=rules.split.output.validation,
        model=P.model.path,
    output:
        f"{RES}/eval/phases/base/metrics.csv",
    log:
        "logs/evaluate/base.log",
    conda:
        ENV
    threads: P.resources.eval.cpus
    resources:
        **job_resources(P, "eval"),
    params:
        settings=settings(P, "seed", "model", "eval", "captions", "faces"),
        out_dir=output_parent(0),
    shell:
        "facelora evaluate base --validation {input.validation} --out {params.out_dir}"
        " > {log} 2>&1"


rule evaluate:
    input:
        training=f"{RES}/train/{{phase}}/train.json",
        validation=rules.split.output.validation,
        model=P.model.path,
    output:
        f"{RES}/eval/phases/{{phase}}/group-{{group}}/metrics.csv",
    log:
        "logs/evaluate/{phase}-{group}.log",
    wildcard_constraints:
        phase="|".join(PHASES),
        group=r"\d+",
    conda:
        ENV
    threads: P.resources.eval.cpus
    resources:
        **job_resources(P, "eval"),
    params:
        settings=settings(P, "seed", "model", "eval", "captions", "faces"),
        out_dir=output_parent(0),
        train_dir=lambda w: f"{RES}/train/{w.phase}",
    shell:
        "facelora evaluate {wildcards.phase} --group {wildcards.group}"
        " --validation {input.validation} --train-dir {params.train_dir}"
        " --out {params.out_dir} > {log} 2>&1"


rule choose:
    input:
        base=rules.evaluate_base.output,
        groups=eval_group_outputs(P, RES),
    output:
        f"{RES}/eval/phases/{{phase}}/best.json",
    log:
        "logs/choose/{phase}.log",
    wildcard_constraints:
        phase="|".join(PHASES),
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "objective", "eval"),
        eval_root=output_parent(0, 3),
        train_root=f"{RES}/train",
    shell:
        "facelora choose {wildcards.phase} --eval-root {params.eval_root}"
        " --train-root {params.train_root} > {log} 2>&1"


rule choose_base:
    input:
        rules.evaluate_base.output,
    output:
        f"{RES}/eval/phases/base/best.json",
    log:
        "logs/choose/base.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        eval_root=output_parent(0, 3),
        train_root=f"{RES}/train",
    shell:
        "facelora choose base --eval-root {params.eval_root}"
        " --train-root {params.train_root} > {log} 2>&1"


rule eval_report:
    input:
        base=rules.choose_base.output,
        best=expand(f"{RES}/eval/phases/{{phase}}/best.json", phase=PHASES),
        validation=rules.split.output.validation,
    output:
        metrics=f"{RES}/eval/metrics.csv",
        summary=f"{RES}/eval/summary.json",
        plots=expand(f"{RES}/eval/plots/{{phase}}.png", phase=PHASES),
        sheets=expand(f"{RES}/eval/contact/{{phase}}.png", phase=PHASES),
    log:
        "logs/eval_report.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        eval_root=output_parent("summary"),
    shell:
        "facelora eval-report --eval-root {params.eval_root}"
        " --validation {input.validation} > {log} 2>&1"
