# tiny offline models of each family (the demo and the tests; nothing downloaded)


rule make_tiny_model:
    output:
        directory(L.tiny_model()),
    log:
        "logs/make_tiny_model/{family}.log",
    benchmark:
        "logs/benchmarks/make_tiny_model/{family}.tsv"
    wildcard_constraints:
        family="|".join(FAMILY_NAMES),
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=command_settings(P, "make-tiny-model"),
    shell:
        "facelora make-tiny-model {wildcards.family} {output} > {log} 2>&1"
