"""EleutherAI's lm-evaluation-harness (lm-eval 0.4) on our own graph.

- `lm.GptNeoLM`: the harness's `LM` interface (loglikelihood, loglikelihood_rolling,
  generate_until) over an inference.RestoredModel, registered with lm-eval as "gptneo".
- `specs`: task names to task configs: ours (offline, under harness/tasks/), the user's
  (--task_dir), then lm-eval's own.
- `run`: bin/lm_eval and train.harness_tasks: evaluate, append to eval.jsonl, TensorBoard.

lm-eval (requirements-interop.txt) is imported only when a harness task runs, after the
offline switches are set: nothing asks the HF hub for a dataset or a tokenizer.
"""
import importlib
import os

from gptneo.errors import UserError

# What datasets, huggingface_hub and transformers read to stay off the network. A user who
# wants the hub's datasets (lm-eval's own task names) exports them as 0.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def import_lm_eval(module="lm_eval"):
  """Imports `module` of lm-eval after setting the OFFLINE variables (unless already set)."""
  for name, value in OFFLINE.items():
    os.environ.setdefault(name, value)
  try:
    return importlib.import_module(module)
  except ImportError as error:
    if not (error.name or "").startswith("lm_eval"):
      raise
    raise UserError("harness tasks need lm-eval: .venv/bin/pip install -r "
                    "requirements-interop.txt (make install does)") from None
