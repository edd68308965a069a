# pair index -> score pairs (sharded) -> gather -> captions


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
