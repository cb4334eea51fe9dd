from training_app.management.commands.serve import service_processes


def test_one_worker_of_each_queue_by_default():
    processes = service_processes("127.0.0.1", 8000, 2, 8, "")
    assert list(processes) == ["web", "training worker", "generation worker"]
    assert all(environment is None for _, environment in processes.values())
    web, _ = processes["web"]
    assert web[web.index("--bind") + 1] == "127.0.0.1:8000"


def test_one_training_and_one_generation_worker_per_gpu_pinned():
    processes = service_processes("127.0.0.1", 8000, 2, 8, "0, 1")
    workers = {name: env for name, (command, env) in processes.items() if name != "web"}
    assert sorted(workers) == [
        "generation worker (GPU 0)",
        "generation worker (GPU 1)",
        "training worker (GPU 0)",
        "training worker (GPU 1)",
    ]
    assert workers["training worker (GPU 1)"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert workers["generation worker (GPU 0)"]["CUDA_VISIBLE_DEVICES"] == "0"
    command, _ = processes["generation worker (GPU 1)"]
    assert command[-2:] == ["worker", "generation"]
