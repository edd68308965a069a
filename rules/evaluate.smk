# every checkpoint judged on the held-out pairs -> the best per phase -> one report


rule evaluate_base:
    input:
        validation=rules.split.output.validation,
        model=P.model.path,
    output:
        metrics=L.base_metrics(),
        backends=L.metric_backends(L.base_dir()),
    log:
        "logs/evaluate/base.log",
    benchmark:
        "logs/benchmarks/evaluate/base.tsv"
    conda:
        ENV
    threads: P.resources.eval.cpus
    resources:
        **job_resources(P, "eval"),
    params:
        settings=command_settings(P, "evaluate base"),
        out_dir=folder(L.base_dir()),
    shell:
        "facelora evaluate base --validation {input.validation} --out {params.out_dir}"
        " --metrics-out {output.metrics} --backends-out {output.backends} > {log} 2>&1"


rule evaluate:
    input:
        training=L.train_summary(),
        validation=rules.split.output.validation,
        model=P.model.path,
    output:
        metrics=L.eval_group_metrics(),
        backends=L.metric_backends(L.eval_group_dir()),
    log:
        "logs/evaluate/{phase}-{group}.log",
    benchmark:
        "logs/benchmarks/evaluate/{phase}-{group}.tsv"
    wildcard_constraints:
        phase="|".join(PHASES),
        group=r"\d+",
    conda:
        ENV
    threads: P.resources.eval.cpus
    resources:
        **job_resources(P, "eval"),
    params:
        settings=command_settings(P, "evaluate"),
        out_dir=lambda w: L.eval_group_dir(w.phase, w.group),
        train_dir=lambda w: L.train_dir(w.phase),
    shell:
        "facelora evaluate {wildcards.phase} --group {wildcards.group}"
        " --validation {input.validation} --train-dir {params.train_dir}"
        " --out {params.out_dir} --metrics-out {output.metrics}"
        " --backends-out {output.backends} > {log} 2>&1"


rule choose:
    input:
        base=L.base_metrics(),
        groups=eval_group_outputs(P, L),
    output:
        best=L.best(),
        live=directory(L.eval_live_dir()),
    log:
        "logs/choose/{phase}.log",
    benchmark:
        "logs/benchmarks/choose/{phase}.tsv"
    wildcard_constraints:
        phase="|".join(PHASES),
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "choose"),
        results=folder(L.root),
    shell:
        "facelora choose {wildcards.phase} --results {params.results} --out {output.best}"
        " --live-out {output.live} > {log} 2>&1"


rule choose_base:
    input:
        L.base_metrics(),
    output:
        L.best("base"),
    log:
        "logs/choose/base.log",
    benchmark:
        "logs/benchmarks/choose/base.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "choose base"),
        results=folder(L.root),
    shell:
        "facelora choose base --results {params.results} --out {output} > {log} 2>&1"


rule eval_report:
    input:
        base=rules.choose_base.output,
        best=expand(L.best(), phase=PHASES),
        groups=all_eval_group_outputs(P, L),
        validation=rules.split.output.validation,
    output:
        metrics=L.eval_metrics(),
        summary=L.eval_summary(),
        plots=[
            report(
                L.eval_plot(phase),
                caption="../report/eval_plot.rst",
                category=EVALUATION,
                subcategory=phase,
                labels={"phase": phase, "figure": "metrics per checkpoint"},
            )
            for phase in PHASES
        ],
        sheets=[
            report(
                L.contact_sheet(phase),
                caption="../report/contact_sheet.rst",
                category=EVALUATION,
                subcategory=phase,
                labels={"phase": phase, "figure": "contact sheet"},
            )
            for phase in PHASES
        ],
    log:
        "logs/eval_report.log",
    benchmark:
        "logs/benchmarks/eval_report.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "eval-report"),
        results=folder(L.root),
    shell:
        "facelora eval-report --results {params.results} --validation {input.validation}"
        " --metrics-out {output.metrics} --summary-out {output.summary}"
        " --plots-out {output.plots} --sheets-out {output.sheets} > {log} 2>&1"
