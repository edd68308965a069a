# one LoRA per phase, each starting from the previous phase's (training resumes by itself)


rule train:
    input:
        data=L.phase_dir(),
        model=P.model.path,
        previous=previous_training(P, L),
    output:
        summary=L.train_summary(),
        plot=report(
            L.loss_plot(),
            caption="../report/loss.rst",
            category=TRAINING,
            subcategory="{phase}",
            labels={"phase": "{phase}", "figure": "loss"},
        ),
        live=directory(L.train_live_dir()),
    log:
        "logs/train/{phase}.log",
    benchmark:
        "logs/benchmarks/train/{phase}.tsv"
    wildcard_constraints:
        phase="|".join(PHASES),
    conda:
        ENV
    threads: P.resources.train.cpus
    resources:
        **job_resources(P, "train"),
    params:
        settings=command_settings(P, "train"),
        train_dir=lambda w: L.train_dir(w.phase),
        results=folder(L.root),
        cache=folder(L.cache_dir()),
        processes=train_processes(P),
        nodes=P.resources.train.nodes,
    shell:
        "facelora train {wildcards.phase} --data {input.data} --out {params.train_dir}"
        " --summary-out {output.summary} --plot-out {output.plot} --live-out {output.live}"
        " --results {params.results}"
        " --cache {params.cache} --processes {params.processes} --nodes {params.nodes}"
        " > {log} 2>&1"


rule train_all:
    input:
        expand(L.train_summary(), phase=PHASES),
