"""The Dagster run machinery: the instance in $DAGSTER_HOME, running a job in this process or through the run
queue of the cluster profile, what a run's events say, the profile's Postgres databases and the `exec` wrapper
of its processes. Kept free of imports here, so that `python -m lora_pipeline.runs.exec` starts quickly."""
