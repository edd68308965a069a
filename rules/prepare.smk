# the data half: detect -> crop -> pair index -> pair scores -> captions -> split -> phases
# -> summary (detect, crop and pair are sharded: each shard is one job)


rule detect:
    input:
        lambda w: raw_images(P, int(w.shard)),
    output:
        faces=f"{RES}/faces/shards/{{shard}}.faces.parquet",
        images=f"{RES}/faces/shards/{{shard}}.images.parquet",
    log:
        "logs/detect/{shard}.log",
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "images", "faces"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
    shell:
        "facelora detect {params.raw:q} --shard {params.shard} --out {output.faces}"
        " --images-out {output.images} --workers {threads} > {log} 2>&1"


rule gather_faces:
    input:
        faces=expand(f"{RES}/faces/shards/{{shard}}.faces.parquet", shard=SHARDS),
        images=expand(f"{RES}/faces/shards/{{shard}}.images.parquet", shard=SHARDS),
    output:
        faces=f"{RES}/faces/faces.parquet",
        images=f"{RES}/faces/images.parquet",
        rejected=f"{RES}/faces/rejected.csv",
    log:
        "logs/gather_faces.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    shell:
        "facelora gather faces {input.faces} --out {output.faces} > {log} 2>&1"


rule crop:
    input:
        photos=lambda w: raw_images(P, int(w.shard)),
        faces=rules.gather_faces.output.faces,
        images=rules.gather_faces.output.images,
    output:
        shard=f"{RES}/crops/shards/{{shard}}.crops.parquet",
    log:
        "logs/crop/{shard}.log",
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "images", "crop"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
        out_dir=output_parent("shard", 2),
    shell:
        "facelora crop --raw {params.raw:q} --faces {input.faces} --images {input.images}"
        " --out-dir {params.out_dir} --shard {params.shard} --shard-out {output.shard}"
        " --workers {threads} > {log} 2>&1"


rule gather_crops:
    input:
        expand(f"{RES}/crops/shards/{{shard}}.crops.parquet", shard=SHARDS),
    output:
        crops=f"{RES}/crops/crops.parquet",
        rejected=f"{RES}/crops/rejected.csv",
    log:
        "logs/gather_crops.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        out_dir=output_parent("crops"),
    shell:
        "facelora gather crops {input} --out-dir {params.out_dir} > {log} 2>&1"


rule pair_index:
    input:
        photos=raw_images(P),
        sidecars=raw_sidecars(P),
        images=rules.gather_faces.output.images,
        faces=rules.gather_faces.output.faces,
        crops=rules.gather_crops.output.crops,
    output:
        index=f"{RES}/pairs/index.parquet",
        rejected=f"{RES}/pairs/index_rejected.csv",
    log:
        "logs/pair_index.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "images", "pairs", "faces"),
        raw=RAW,
    shell:
        "facelora pair-index --raw {params.raw:q} --images {input.images} --faces {input.faces}"
        " --crops {input.crops} --out {output.index} > {log} 2>&1"


rule pair:
    input:
        index=rules.pair_index.output.index,
        images=rules.gather_faces.output.images,
        faces=rules.gather_faces.output.faces,
        crops=rules.gather_crops.output.crops,
    output:
        shard=f"{RES}/pairs/shards/{{shard}}.pairs.parquet",
    log:
        "logs/pair/{shard}.log",
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "images", "crop", "pairs"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
        out_dir=output_parent("shard", 2),
    shell:
        "facelora pair --index {input.index} --raw {params.raw:q} --images {input.images}"
        " --faces {input.faces} --crops {input.crops} --out-dir {params.out_dir}"
        " --shard {params.shard} --shard-out {output.shard} --workers {threads} > {log} 2>&1"


rule gather_pairs:
    input:
        shards=expand(f"{RES}/pairs/shards/{{shard}}.pairs.parquet", shard=SHARDS),
        index=rules.pair_index.output.index,
        index_rejected=rules.pair_index.output.rejected,
    output:
        pairs=f"{RES}/pairs/pairs.parquet",
        rejected=f"{RES}/pairs/rejected.csv",
    log:
        "logs/gather_pairs.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "pairs"),
        out_dir=output_parent("pairs"),
    shell:
        "facelora gather pairs {input.shards} --index {input.index}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule caption:
    input:
        rules.gather_pairs.output.pairs,
    output:
        captions=f"{RES}/captions/captions.parquet",
        lint=f"{RES}/captions/lint.csv",
        rejected=f"{RES}/captions/rejected.csv",
    log:
        "logs/caption.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "captions", "pairs"),
        out_dir=output_parent("captions"),
    shell:
        "facelora caption --pairs {input} --out-dir {params.out_dir} > {log} 2>&1"


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
