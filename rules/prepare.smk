# the data half: detect -> crop -> (synthesize, rules/synthesis.smk) -> pair index -> pair scores -> captions -> split -> phases
# -> summary (detect, crop and pair are sharded: each shard is one job)


rule detect:
    input:
        L.raw_listing(),
    output:
        faces=L.faces_shard(),
        images=L.images_shard(),
    log:
        "logs/detect/{shard}.log",
    benchmark:
        "logs/benchmarks/detect/{shard}.tsv"
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "detect"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
    shell:
        "facelora detect {params.raw:q} --shard {params.shard} --listing {input}"
        " --out {output.faces}"
        " --images-out {output.images} --workers {threads} > {log} 2>&1"


rule gather_faces:
    input:
        faces=expand(L.faces_shard(), shard=SHARDS),
        images=expand(L.images_shard(), shard=SHARDS),
    output:
        faces=L.faces(),
        images=L.images(),
        rejected=L.faces_rejected(),
    log:
        "logs/gather_faces.log",
    benchmark:
        "logs/benchmarks/gather_faces.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "gather faces"),
    shell:
        "facelora gather faces {input.faces} --images-shards {input.images}"
        " --out {output.faces} --images-out {output.images}"
        " --rejected-out {output.rejected} > {log} 2>&1"


rule crop:
    input:
        listing=L.raw_listing(),
        faces=rules.gather_faces.output.faces,
        images=rules.gather_faces.output.images,
    output:
        shard=L.crops_shard(),
    log:
        "logs/crop/{shard}.log",
    benchmark:
        "logs/benchmarks/crop/{shard}.tsv"
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "crop"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
        crops_dir=folder(L.crops_dir()),
    shell:
        "facelora crop --raw {params.raw:q} --faces {input.faces} --images {input.images}"
        " --out-dir {params.crops_dir} --shard {params.shard} --shard-out {output.shard}"
        " --workers {threads} > {log} 2>&1"


rule gather_crops:
    input:
        expand(L.crops_shard(), shard=SHARDS),
    output:
        crops=L.crops(),
        rejected=L.crops_rejected(),
    log:
        "logs/gather_crops.log",
    benchmark:
        "logs/benchmarks/gather_crops.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "gather crops"),
        crops_dir=folder(L.crops_dir()),
    shell:
        "facelora gather crops {input} --images-dir {params.crops_dir} --out {output.crops}"
        " --rejected-out {output.rejected} > {log} 2>&1"


rule pair_index:
    input:
        listings=expand(L.raw_listing(), shard=SHARDS),
        sidecars=L.raw_sidecars_listing(),
        images=rules.gather_faces.output.images,
        faces=rules.gather_faces.output.faces,
        crops=rules.gather_crops.output.crops,
        made=expand(L.synthesis_manifest(), kind=KINDS),
    output:
        index=L.pair_index(),
        rejected=L.pair_index_rejected(),
    log:
        "logs/pair_index.log",
    benchmark:
        "logs/benchmarks/pair_index.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "pair-index"),
        raw=RAW,
        made=lambda w: MADE,
    shell:
        "facelora pair-index --raw {params.raw:q} --images {input.images} --faces {input.faces}"
        " --crops {input.crops} --made {params.made} --out {output.index}"
        " --rejected-out {output.rejected} > {log} 2>&1"


rule pair:
    input:
        index=rules.pair_index.output.index,
        images=rules.gather_faces.output.images,
        faces=rules.gather_faces.output.faces,
        crops=rules.gather_crops.output.crops,
        made=expand(L.synthesis_faces(), kind=KINDS),
    output:
        shard=L.pairs_shard(),
    log:
        "logs/pair/{shard}.log",
    benchmark:
        "logs/benchmarks/pair/{shard}.tsv"
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "pair"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
        crops_dir=folder(L.crops_dir()),
        pairs_dir=folder(L.pairs_dir()),
        made=lambda w: MADE,
    shell:
        "facelora pair --index {input.index} --raw {params.raw:q} --images {input.images}"
        " --faces {input.faces} --crops {input.crops} --crops-dir {params.crops_dir}"
        " --made {params.made} --out-dir {params.pairs_dir} --shard {params.shard}"
        " --shard-out {output.shard} --workers {threads} > {log} 2>&1"


rule gather_pairs:
    input:
        shards=expand(L.pairs_shard(), shard=SHARDS),
        index_rejected=rules.pair_index.output.rejected,
    output:
        pairs=L.pairs(),
        rejected=L.pairs_rejected(),
    log:
        "logs/gather_pairs.log",
    benchmark:
        "logs/benchmarks/gather_pairs.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "gather pairs"),
        pairs_dir=folder(L.pairs_dir()),
    shell:
        "facelora gather pairs {input.shards} --index-rejected {input.index_rejected}"
        " --images-dir {params.pairs_dir} --out {output.pairs}"
        " --rejected-out {output.rejected} > {log} 2>&1"


rule caption:
    input:
        rules.gather_pairs.output.pairs,
    output:
        captions=L.captions(),
        lint=L.captions_lint(),
        rejected=L.captions_rejected(),
    log:
        "logs/caption.log",
    benchmark:
        "logs/benchmarks/caption.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "caption"),
        pairs_dir=folder(L.pairs_dir()),
    shell:
        "facelora caption --pairs {input} --pairs-dir {params.pairs_dir}"
        " --out {output.captions} --lint-out {output.lint}"
        " --rejected-out {output.rejected} > {log} 2>&1"


rule split:
    input:
        pairs=rules.gather_pairs.output.pairs,
        captions=rules.caption.output.captions,
        faces=rules.gather_faces.output.faces,
        made=expand(L.synthesis_faces(), kind=KINDS),
    output:
        split=L.split(),
        validation=directory(L.validation_dir()),
    log:
        "logs/split.log",
    benchmark:
        "logs/benchmarks/split.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "split"),
        pairs_dir=folder(L.pairs_dir()),
        made=lambda w: MADE,
    shell:
        "facelora split --pairs {input.pairs} --pairs-dir {params.pairs_dir}"
        " --captions {input.captions}"
        " --faces {input.faces} --made {params.made} --out {output.split}"
        " --validation-dir {output.validation} > {log} 2>&1"


rule select_phase:
    input:
        pairs=rules.gather_pairs.output.pairs,
        captions=rules.caption.output.captions,
        split=rules.split.output.split,
    output:
        directory(L.phase_dir()),
    log:
        "logs/select/{phase}.log",
    benchmark:
        "logs/benchmarks/select/{phase}.tsv"
    wildcard_constraints:
        phase="|".join(PHASES),
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "select"),
        pairs_dir=folder(L.pairs_dir()),
    shell:
        "facelora select {wildcards.phase} --pairs {input.pairs} --pairs-dir {params.pairs_dir}"
        " --captions {input.captions} --split {input.split} --out-dir {output} > {log} 2>&1"


rule summary:
    input:
        split=rules.split.output.split,
        phases=expand(L.phase_dir(), phase=PHASES),
        made=expand(L.synthesis_manifest(), kind=KINDS),
    output:
        summary=L.summary(),
        funnel=report(
            L.funnel_plot(),
            caption="../report/funnel.rst",
            category=DATA,
            labels={"figure": "funnel"},
        ),
        scores=report(
            L.scores_plot(),
            caption="../report/scores.rst",
            category=DATA,
            labels={"figure": "pair scores"},
        ),
    log:
        "logs/summary.log",
    benchmark:
        "logs/benchmarks/summary.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "summary"),
        results=folder(L.root),
    shell:
        "facelora summary --results {params.results} --out {output.summary}"
        " --funnel-out {output.funnel} --scores-out {output.scores} > {log} 2>&1"


rule prepare:
    input:
        rules.summary.output,
        rules.split.output,
        expand(L.phase_dir(), phase=PHASES),
        L.synthesis_summary(),
