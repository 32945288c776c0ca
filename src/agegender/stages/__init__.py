"""The pipeline, one short script per stage, each run by dvc.yaml as `python -m
agegender.stages.<name>`. Nothing imports a stage."""
