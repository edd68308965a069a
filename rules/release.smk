# the final LoRA: the last phase's chosen checkpoint, both key layouts, a model card


rule final:
    input:
        best=L.best(PHASES[-1]),
        report=rules.eval_report.output.summary,
    output:
        directory(L.final_dir()),
    log:
        "logs/final.log",
    benchmark:
        "logs/benchmarks/final.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "final"),
        results=folder(L.root),
    shell:
        "facelora final --results {params.results} --out {output} > {log} 2>&1"


rule report_pages:
    input:
        summary=rules.summary.output.summary,
        final=rules.final.output,
    output:
        funnel=report(
            L.report_funnel_page(),
            caption="../report/funnel_page.rst",
            category=DATA,
            labels={"figure": "rejections"},
        ),
        card=report(
            L.report_card_page(),
            caption="../report/model_card.rst",
            category=MODEL,
            labels={"figure": "model card"},
        ),
    log:
        "logs/report_pages.log",
    benchmark:
        "logs/benchmarks/report_pages.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "report-pages"),
        results=folder(L.root),
    shell:
        "facelora report-pages --results {params.results} --funnel-out {output.funnel}"
        " --card-out {output.card} > {log} 2>&1"
