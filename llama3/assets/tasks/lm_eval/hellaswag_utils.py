"""lm-evaluation-harness's own HellaSwag preprocessing, for llama3_sample_hellaswag.yaml."""

from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401
