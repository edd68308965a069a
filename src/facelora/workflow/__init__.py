"""The `facelora` command line and the glue Snakemake and DVC use to run the stages."""
