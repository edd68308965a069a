# the final LoRA: the last phase's chosen checkpoint, both key layouts, a model card


rule final:
    input:
        best=f"{RES}/eval/phases/{PHASES[-1]}/best.json",
        report=rules.eval_report.output.summary,
    output:
        lora=f"{RES}/final/pytorch_lora_weights.safetensors",
        comfyui=f"{RES}/final/lora_comfyui.safetensors",
        card=f"{RES}/final/README.md",
    log:
        "logs/final.log",
    conda:
        ENV
    resources:
        **job_resources(P, "data"),
    params:
        settings=settings(P, "final", "objective"),
        results=output_parent("lora", 2),
        out_dir=output_parent("lora"),
    shell:
        "facelora final --results {params.results} --out {params.out_dir} > {log} 2>&1"
