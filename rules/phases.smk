# validation split -> one dataset per phase -> summary


rule split:
    input:
        pairs=rules.gather_pairs.output.pairs,
        captions=rules.caption.output.captions,
        faces=rules.gather_faces.output.faces,
    output:
        split=f"{RES}/split/split.parquet",
        validation=directory(f"{RES}/validation"),
    log:
        "logs/split.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "seed", "split", "faces"),
    shell:
        "facelora split --pairs {input.pairs} --captions {input.captions}"
        " --faces {input.faces} --out {output.split}"
        " --validation-dir {output.validation} > {log} 2>&1"


rule select_phase:
    input:
        pairs=rules.gather_pairs.output.pairs,
        captions=rules.caption.output.captions,
        split=rules.split.output.split,
    output:
        directory(f"{RES}/phases/{{phase}}"),
    log:
        "logs/select/{phase}.log",
    wildcard_constraints:
        phase="|".join(PHASES),
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=lambda w: P.phase(w.phase).model_dump(mode="json"),
        order=PHASES,
    shell:
        "facelora select {wildcards.phase} --pairs {input.pairs}"
        " --captions {input.captions} --split {input.split} --out-dir {output} > {log} 2>&1"


rule summary:
    input:
        split=rules.split.output.split,
        phases=expand(f"{RES}/phases/{{phase}}", phase=PHASES),
    output:
        summary=f"{RES}/summary/summary.json",
        funnel=f"{RES}/summary/funnel.png",
        scores=f"{RES}/summary/scores.png",
    log:
        "logs/summary.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        results=output_parent("summary", 2),
        out_dir=output_parent("summary"),
    shell:
        "facelora summary --results {params.results} --out-dir {params.out_dir} > {log} 2>&1"


rule prepare:
    input:
        rules.summary.output,
        rules.split.output,
        expand(f"{RES}/phases/{{phase}}", phase=PHASES),
