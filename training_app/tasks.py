"""django-q2 tasks: each takes an id, reloads the row and calls a service.

Both are safe to run twice: the service claims the row with a conditional update and
does nothing when it is no longer queued.
"""

from training_app.services.generations.batches import generation_execute
from training_app.services.runs import training_run_execute


def train_lora_task(run_id: int) -> None:
    training_run_execute(run_id)


def generate_task(generation_id: int) -> None:
    generation_execute(generation_id)


def warm_up_task(queue: str = "training") -> None:
    """Loads the worker's pipelines (and, for generation, compiles them) before the first
    real job needs them. (Without `queue`: a warm-up queued by a training worker of an
    earlier version, which passed none.)"""
    from training_app.runtime import generation_pipelines, worker_pipelines

    if queue == "generation":
        generation_pipelines()
    else:
        worker_pipelines("training")
