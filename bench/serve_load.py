"""Images per minute from one GPU over HTTP: one client at a time against eight at once.

Starts `manage.py serve` (SDXL_MODEL_PRESET=sdxl-random: full-size SDXL with random
weights, see gpu_service_check.py; SDXL_COMPILE as the environment says), uploads two
random LoRAs into two sessions, then sends 1024², 30-step, one-image /txt2img requests
that take turns between LoRA a, LoRA b and none:

* one client: each request sent when the previous one has answered;
* `--clients` clients at once, each doing the same.

Both figures count images answered per minute of wall time, from the first request sent to
the last answer. The generation worker batches queued requests that share size, steps,
guidance and LoRA (SDXL_GENERATION_BATCH_IMAGES); the worker's log says which ran together.

    python -m bench.serve_load --out results/     # writes serve-load.json and serve.log
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import threading
import time
from pathlib import Path

import requests
import torch

from bench.common import environment, random_lora
from bench.gpu_service_check import (
    build_model,
    running_service,
    service_env,
    wait_for_generation_worker,
)
from sdxl_engine.generation import resolve_model_source

BODY = {
    "prompt": "a photo of sks dog on a beach, golden hour",
    "num_images": 1,
    "height": 1024,
    "width": 1024,
    "guidance_scale": 7.0,
    "steps": 30,
}


def upload_lora(url: str, path: Path) -> int:
    session_id = requests.get(f"{url}/create_session", timeout=10).json()["session_id"]
    response = requests.post(
        f"{url}/upload_lora",
        json={
            "session_id": str(session_id),
            "lora_base64": base64.b64encode(path.read_bytes()).decode(),
        },
        timeout=120,
    )
    response.raise_for_status()
    return session_id


def request_body(index: int, lora_sessions: list[int], seed: int) -> dict:
    """Request `index` of a client: LoRA a, LoRA b, no LoRA, in turn."""
    turn = index % (len(lora_sessions) + 1)
    extra = (
        {"use_lora": True, "session_id": str(lora_sessions[turn])}
        if turn < len(lora_sessions)
        else {}
    )
    return {**BODY, "seed": seed, **extra}


def client(url: str, requests_each: int, lora_sessions: list[int], offset: int, out: list):
    for index in range(requests_each):
        started = time.monotonic()
        response = requests.post(
            f"{url}/txt2img",
            json=request_body(index + offset, lora_sessions, seed=1000 * offset + index),
            timeout=900,
        )
        response.raise_for_status()
        out.append((round(time.monotonic() - started, 3), len(response.json()["images_base64"])))


def images_per_minute(url: str, clients: int, requests_each: int, lora_sessions: list[int]):
    results: list[list] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=client, args=(url, requests_each, lora_sessions, i, results[i]))
        for i in range(clients)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    answered = [entry for per_client in results for entry in per_client]
    images = sum(count for _, count in answered)
    if len(answered) != clients * requests_each:
        raise RuntimeError(f"{clients * requests_each - len(answered)} requests failed")
    latencies = [seconds for seconds, _ in answered]
    return {
        "clients": clients,
        "requests": len(answered),
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_min": round(images * 60 / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
    }


def run_load(
    out: Path,
    data_dir: Path,
    preset: str = "sdxl-random",
    clients: int = 8,
    requests_each: int = 4,
    single_requests: int = 9,
) -> dict:
    """Starts the service on `data_dir` (its model files under `data_dir`/models, or
    SDXL_MODEL_CACHE_DIR), measures one client and `clients` clients; writes serve.log
    under `out` and returns the figures."""
    results: dict = {}
    data_dir.mkdir(parents=True, exist_ok=True)
    env = service_env(data_dir, preset=preset)
    models = Path(env.get("SDXL_MODEL_CACHE_DIR") or data_dir / "models")
    results["build_model_s"] = build_model(env, models)
    source = resolve_model_source(preset, "", "", models)
    unet_config = json.loads((Path(source.base) / "unet" / "config.json").read_text())
    loras = [
        random_lora(data_dir / f"load_lora_{name}.safetensors", unet_config, seed)
        for name, seed in (("a", 1), ("b", 2))
    ]
    if preset == "tiny":
        BODY.update(height=64, width=64, steps=5)
    started = time.monotonic()
    service = running_service(env, out / "serve.log")
    try:
        with service as url:
            wait_for_generation_worker(url, {**BODY, "seed": 0}, timeout_s=600)
            # From `serve` started to the first image answered: the worker's load and compile.
            results["first_image_s"] = round(time.monotonic() - started, 1)
            lora_sessions = [upload_lora(url, path) for path in loras]
            # Each LoRA once before timing: its file is read and cached by the worker.
            for index in range(len(lora_sessions) + 1):
                requests.post(
                    f"{url}/txt2img", json=request_body(index, lora_sessions, 1), timeout=900
                ).raise_for_status()
            results["single_client"] = images_per_minute(url, 1, single_requests, lora_sessions)
            print(json.dumps(results, indent=2), flush=True)
            results["concurrent"] = images_per_minute(url, clients, requests_each, lora_sessions)
    finally:
        results["serve_exit_code"] = service.exit_code
        results["cuda_in_this_process"] = torch.cuda.is_initialized()
        log = (out / "serve.log").read_text(errors="replace").splitlines()
        results["batches_logged"] = [line for line in log if "run as one batch" in line][-20:]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/sdxl-service-data"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-each", type=int, default=4)
    parser.add_argument("--single-requests", type=int, default=9)
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {**environment(), "part": "serve"}
    try:
        results.update(
            run_load(
                args.out,
                args.data_dir,
                args.preset,
                args.clients,
                args.requests_each,
                args.single_requests,
            )
        )
    finally:
        (args.out / "serve-load.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    main()
