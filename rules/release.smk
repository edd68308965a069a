# the final LoRA: the last phase's chosen checkpoint, both key layouts, a model card


rule final:
    input:
        best=L.best(PHASES[-1]),
        report=rules.eval_report.output.summary,
    output:
        directory(L.final_dir()),
    log:
        "logs/final.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "final"),
        results=folder(L.root),
    shell:
        "facelora final --results {params.results} --out {output} > {log} 2>&1"
