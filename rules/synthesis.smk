# synthesized pairs, after the face crops and before pairing: each kind of synthesis.kinds
# is one folder of pairs (sharded jobs, then a gather); the pair steps read every folder


rule synthesize:
    input:
        crops=rules.gather_crops.output.crops,
        faces=rules.gather_faces.output.faces,
        images=rules.gather_faces.output.images,
    output:
        manifest=L.synthesis_shard_manifest(),
        images=L.synthesis_shard_images(),
        faces=L.synthesis_shard_faces(),
    log:
        "logs/synthesize/{kind}/{shard}.log",
    benchmark:
        "logs/benchmarks/synthesize/{kind}/{shard}.tsv"
    wildcard_constraints:
        kind=synthesis_kinds(P, on_gpu=False),
    conda:
        ENV
    threads: P.workflow.workers
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "synthesize"),
        raw=RAW,
        shard=lambda w: f"{w.shard}/{N_SHARDS}",
        crops_dir=folder(L.crops_dir()),
        out=lambda w: L.synthesis_dir(w.kind),
        cache=folder(L.synthesis_cache_dir()),
    shell:
        "facelora synthesize {wildcards.kind} {params.raw:q} --out {params.out}"
        " --crops {input.crops} --faces {input.faces} --images {input.images}"
        " --crops-dir {params.crops_dir} --cache {params.cache} --shard {params.shard}"
        " --manifest-out {output.manifest} --images-out {output.images}"
        " --faces-out {output.faces} --workers {threads} > {log} 2>&1"


# the edit kind with a local pipeline (synthesis.generator.backend: diffusers): a GPU job
use rule synthesize as synthesize_on_gpu with:
    wildcard_constraints:
        kind=synthesis_kinds(P, on_gpu=True),
    resources:
        **job_resources(P, "synthesis"),


rule gather_synthesis:
    input:
        manifests=expand(
            L.synthesis_shard_manifest("{{kind}}", "{shard}"), shard=SHARDS
        ),
        images=expand(L.synthesis_shard_images("{{kind}}", "{shard}"), shard=SHARDS),
        faces=expand(L.synthesis_shard_faces("{{kind}}", "{shard}"), shard=SHARDS),
    output:
        manifest=L.synthesis_manifest(),
        images=L.synthesis_images(),
        faces=L.synthesis_faces(),
        failed=L.synthesis_failed(),
    log:
        "logs/gather_synthesis/{kind}.log",
    benchmark:
        "logs/benchmarks/gather_synthesis/{kind}.tsv"
    wildcard_constraints:
        kind="|".join(KINDS) or "-",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "gather synthesis"),
        out=lambda w: L.synthesis_dir(w.kind),
    shell:
        "facelora gather synthesis {input.manifests} --images-shards {input.images}"
        " --faces-shards {input.faces} --out {params.out} > {log} 2>&1"


rule synthesis:
    input:
        expand(L.synthesis_manifest(), kind=KINDS),
    output:
        L.synthesis_summary(),
    log:
        "logs/synthesis.log",
    benchmark:
        "logs/benchmarks/synthesis.tsv"
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "synthesis-summary"),
        made=lambda w: MADE,
    shell:
        "facelora synthesis-summary --made {params.made} --out {output} > {log} 2>&1"
