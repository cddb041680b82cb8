# The cluster profile's settings; `source deploy/cluster/env.sh` on every machine (edit the hosts first).
# Values already set in the environment win. `make cluster-demo` uses these defaults on one machine.
: "${LORA_PIPELINE_PG:=postgresql+psycopg2://postgres@127.0.0.1:5432}"
export LORA_PIPELINE_DAGSTER_PG_URL="${LORA_PIPELINE_DAGSTER_PG_URL:-$LORA_PIPELINE_PG/lora_dagster}"
export LORA_PIPELINE_MLFLOW_BACKEND="${LORA_PIPELINE_MLFLOW_BACKEND:-$LORA_PIPELINE_PG/lora_mlflow}"
export LORA_PIPELINE_MLFLOW_URI="${LORA_PIPELINE_MLFLOW_URI:-http://127.0.0.1:5000}"
export LORA_PIPELINE_CELERY_BROKER="${LORA_PIPELINE_CELERY_BROKER:-pyamqp://guest:guest@127.0.0.1:5672//}"
export LORA_PIPELINE_CELERY_BACKEND="${LORA_PIPELINE_CELERY_BACKEND:-redis://127.0.0.1:6379/0}"
export LORA_PIPELINE_EXECUTOR=celery
# Processes (GPUs) one training runs in on a GPU box: DDP through `accelerate launch` when more than 1.
export LORA_PIPELINE_TRAIN_PROCESSES="${LORA_PIPELINE_TRAIN_PROCESSES:-1}"
# The one shared data root (NFS or similar) that every machine mounts at the same path; nothing is copied
# between workers. MLflow's artifacts live in it too.
export LORA_PIPELINE_DATA="${LORA_PIPELINE_DATA:-$PWD/data}"
# The pipeline runs no MLflow server jobs (its GenAI scorers and periodic tasks): off, `mlflow server` starts no
# huey consumer processes beside itself.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
