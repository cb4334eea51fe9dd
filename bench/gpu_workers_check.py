"""Workers sharing a GPU and workers on several GPUs, through the real service.

Full-size SDXL with random weights (SDXL_MODEL_PRESET=sdxl-random), as in
`gpu_service_check.py`:
  1. one GPU (`serve --gpus 0`): /txt2img latency alone, then while a training run
     (1024², batch 4) trains on the same GPU;
  2. throughput of concurrent /txt2img requests with one GPU's workers (`--gpus 0`) and
     with two GPUs' (`--gpus 0,1`), all on the same queues.

    python bench/gpu_workers_check.py --out results/
"""

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_service_check import (  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/sdxl-workers-data"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    BODY["height"] = BODY["width"] = args.size
    env = service_env(args.data_dir, args.preset)
    results: dict = {
        "command": " ".join(sys.argv),
        "build_random_sdxl_s": build_model(env, args.data_dir),
    }
    try:
        with running_service(env, args.out / "serve-1gpu.log", "--gpus", "0") as url:
            wait_for_generation_worker(url, BODY)
            results["one_gpu_txt2img_alone_s"] = [round(txt2img(url, s), 2) for s in range(3)]
            session = session_with_images(url, 4, args.size)
            status, while_training = train_while_generating(
                url,
                {"session_id": session, "steps": args.train_steps, "resolution": args.size},
                lambda index: txt2img(url, index),
            )
            results["one_gpu_txt2img_while_training_s"] = while_training
            results["training_status"] = status
            results["one_gpu_throughput"] = throughput(url, args.requests, 1)
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
