# tiny offline models of each family (the demo and the tests; nothing downloaded)


rule make_tiny_model:
    output:
        directory(f"{RES}/models/tiny-{{family}}"),
    log:
        "logs/make_tiny_model/{family}.log",
    wildcard_constraints:
        family="qwen_image_edit|flux2_klein",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    shell:
        "facelora make-tiny-model {wildcards.family} {output} > {log} 2>&1"
