"""Workers sharing a GPU and workers on several GPUs, through the real service.

Full-size SDXL with random weights (SDXL_MODEL_PRESET=sdxl-random), as in
`gpu_service_check.py`:
  1. one GPU (`serve --gpus 0`): /txt2img latency alone, then while a training run
     (1024², batch 4) trains on the same GPU;
  2. throughput of concurrent /txt2img requests with one GPU's workers (`--gpus 0`) and
     with two GPUs' (`--gpus 0,1`), all on the same queues (`--one-gpu`: not this part).

    python -m bench.gpu_workers_check --out results/
"""

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.gpu_service_check import (
    build_model,
    running_service,
    service_env,
    session_with_images,
    timed_txt2img,
    train_while_generating,
    wait_for_generation_worker,
)

BODY = {"prompt": "a photo of sks object", "height": 1024, "width": 1024, "steps": 30}


def txt2img(url: str, seed: int) -> float:
    return timed_txt2img(url, {**BODY, "seed": seed})


def throughput(url: str, requests_count: int, workers: int) -> dict:
    # Each worker's first image pays for CUDA's start-up: warm them all before the clock.
    with ThreadPoolExecutor(max_workers=2 * workers) as pool:
        list(pool.map(lambda seed: txt2img(url, seed), range(2 * workers)))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=requests_count) as pool:
        latencies = list(pool.map(lambda seed: txt2img(url, seed), range(requests_count)))
    wall = time.monotonic() - started
    return {
        "requests": requests_count,
        "wall_s": round(wall, 2),
        "images_per_min": round(60 * requests_count / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 2),
    }


class GpuMemoryPeak:
    """Polls nvidia-smi in a thread during a `with` block: the most memory GPU 0 had in use,
    all processes together (both workers share the card)."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak_mib, self.total_mib = interval_s, 0, 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            used, total = self._query()
            self.peak_mib, self.total_mib = max(self.peak_mib, used), total
            self._stop.wait(self.interval_s)

    @staticmethod
    def _query() -> tuple[int, int]:
        output = subprocess.run(
            ["nvidia-smi", "--id=0", "--query-gpu=memory.used,memory.total",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        used, total = (int(value) for value in output.split(","))
        return used, total

    def __enter__(self) -> "GpuMemoryPeak":
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/sdxl-workers-data"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--one-gpu", action="store_true", help="only part 1 (a machine with one GPU)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    BODY["height"] = BODY["width"] = args.size
    env = service_env(args.data_dir, args.preset)
    results: dict = {
        "command": " ".join(sys.argv),
        "build_random_sdxl_s": build_model(env, args.data_dir / "models"),
    }
    try:
        with running_service(env, args.out / "serve-1gpu.log", "--gpus", "0") as url:
            wait_for_generation_worker(url, BODY)
            results["one_gpu_txt2img_alone_s"] = [round(txt2img(url, s), 2) for s in range(3)]
            session = session_with_images(url, 4, args.size)
            with GpuMemoryPeak() as memory:
                status, while_training = train_while_generating(
                    url,
                    {"session_id": session, "steps": args.train_steps, "resolution": args.size},
                    lambda index: txt2img(url, index),
                )
            results["one_gpu_txt2img_while_training_s"] = while_training
            results["training_status"] = status
            results["gpu_memory_used_peak_mib_while_training"] = memory.peak_mib
            results["gpu_memory_total_mib"] = memory.total_mib
            results["one_gpu_throughput"] = throughput(url, args.requests, 1)
        if args.one_gpu:
            return
        with running_service(env, args.out / "serve-2gpu.log", "--gpus", "0,1") as url:
            wait_for_generation_worker(url, BODY)
            results["two_gpu_throughput"] = throughput(url, args.requests, 2)
        results["two_over_one"] = round(
            results["two_gpu_throughput"]["images_per_min"]
            / results["one_gpu_throughput"]["images_per_min"],
            2,
        )
    finally:
        (args.out / "workers_check.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
