# a target a user asks for (snakemake apply), not part of `all`: the photos of apply.photos
# with their faces edited by the final LoRA (settings: apply.*)


rule apply:
    input:
        photos=existing(P.apply.photos),
        lora=rules.final.output,
        model=P.model.path,
    output:
        directory(L.apply_dir()),
    log:
        "logs/apply.log",
    benchmark:
        "logs/benchmarks/apply.tsv"
    conda:
        ENV
    threads: P.resources.eval.cpus
    resources:
        **job_resources(P, "eval"),
    params:
        settings=command_settings(P, "apply"),
    shell:
        "facelora apply --lora {input.lora} --out {output} > {log} 2>&1"
