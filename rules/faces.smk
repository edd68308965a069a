# detect -> gather -> crop -> gather (sharded: each shard is one job)


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
