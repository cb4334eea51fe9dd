"""The whole service on a GPU with full-size SDXL: `manage.py serve` driven over HTTP.

No SDXL weights can be downloaded where this runs, so it uses SDXL_MODEL_PRESET=sdxl-random:
Base + Refiner built from SDXL's published configs with random weights, written in diffusers
format and loaded through the same `from_pretrained` path real weights take. The images are
noise; shapes, memory and arithmetic are the real model's.

    python -m bench.gpu_service_check --out results/    # writes service_check.json + serve.log
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def noise_png(size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(data_dir: Path, preset: str = "sdxl-random") -> dict:
    return {
        **os.environ,
        "SDXL_MODEL_PRESET": preset,
        "SDXL_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }


def build_model(env: dict, models_dir: Path) -> float:
    """Builds the full-size pair in `models_dir` once before workers start (each would
    otherwise build it, and only one copy would be kept); returns the seconds it took."""
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from pathlib import Path; "
            "from sdxl_engine.generation import resolve_model_source as r; "
            f"print(r('{env['SDXL_MODEL_PRESET']}', '', '', Path('{models_dir}')))",
        ],
        cwd=REPO,
        env=env,
        check=True,
    )
    return round(time.monotonic() - started, 1)


def timed_txt2img(url: str, body: dict) -> float:
    """Seconds one /txt2img request took; raises on an error answer."""
    started = time.monotonic()
    requests.post(f"{url}/txt2img", json=body, timeout=900).raise_for_status()
    return time.monotonic() - started


def wait_for_generation_worker(url: str, body: dict, timeout_s: float = 120) -> float:
    """The web server answers before the workers have started and said so (503 until then);
    returns the seconds of the first image, which includes loading the pipelines."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return timed_txt2img(url, body)
        except requests.HTTPError as error:
            if error.response.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1)


def session_with_images(url: str, count: int, size: int) -> int:
    session_id = requests.get(f"{url}/create_session", timeout=10).json()["session_id"]
    for index in range(count):
        requests.post(
            f"{url}/post_session_image",
            json={
                "session_id": str(session_id),
                "image_base64": noise_png(size, index),
                "prompt": f"a photo of sks object number {index}",
            },
            timeout=60,
        ).raise_for_status()
    return session_id


def train_while_generating(
    url: str, train: dict, generate: Callable[[int], float], most: int | None = None
) -> tuple[dict, list[float]]:
    """Starts the training run `train` and times `generate(i)` over and over while its
    steps run (`most` times at the most); returns the final status and the timings."""
    requests.post(f"{url}/train_lora", json=train, timeout=60).raise_for_status()
    timings: list[float] = []
    while True:
        status = requests.post(
            f"{url}/train_status", json={"session_id": train["session_id"]}, timeout=30
        ).json()
        if status["status"] != "in-progress":
            return status, timings
        if status.get("stage") == "training" and (most is None or len(timings) < most):
            timings.append(round(generate(len(timings)), 2))
        else:
            time.sleep(0.5)


class running_service:  # noqa: N801 - used like a function, as a context manager
    """`manage.py serve` in the background for a `with` block, then SIGINT (as Ctrl-C);
    `exit_code` is the code it exited with."""

    def __init__(self, env: dict, log_path: Path, *serve_args: str):
        self.env, self.log_path, self.serve_args = env, log_path, serve_args
        self.exit_code: int | str | None = None

    def __enter__(self) -> str:
        url = f"http://127.0.0.1:{free_port()}"
        self.log = open(self.log_path, "wb")
        self.serve = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", url.rsplit(":", 1)[1],
             *self.serve_args],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        while True:
            try:
                if requests.get(f"{url}/list_sessions", timeout=2).ok:
                    return url
            except (requests.ConnectionError, requests.Timeout):  # not up yet
                time.sleep(0.5)
            if self.serve.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"serve exited; see {self.log_path}")

    def __exit__(self, *exc_info) -> None:
        self.serve.send_signal(signal.SIGINT)
        try:
            self.exit_code = self.serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.serve.pid, signal.SIGKILL)
            self.exit_code = "killed"
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/sdxl-service-data"))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gen-steps", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv)}

    env = service_env(args.data_dir)
    results["build_random_sdxl_s"] = build_model(env, args.data_dir / "models")
    started = time.monotonic()
    service = running_service(env, args.out / "serve.log")
    try:
        with service as url:
            results["web_ready_s"] = round(time.monotonic() - started, 1)

            session_id = session_with_images(url, args.images, 1024)
            body = {
                "prompt": "a photo of sks object",
                "num_images": 1,
                "height": 1024,
                "width": 1024,
                "guidance_scale": 7.0,
                "steps": args.gen_steps,
                "seed": 1,
            }
            results["first_txt2img_s"] = round(wait_for_generation_worker(url, body), 1)

            started = time.monotonic()
            status, gen_during_training = train_while_generating(
                url,
                {"session_id": session_id, "steps": args.train_steps,
                 "batch_size": args.batch_size},
                lambda _: timed_txt2img(url, body),
                most=2,
            )  # fmt: skip
            results["train_status"] = status
            results["train_wall_s"] = round(time.monotonic() - started, 1)
            results["train_images_seen"] = args.train_steps * args.batch_size
            results["txt2img_while_training_s"] = gen_during_training
            assert status["status"] == "completed", status

            lora = requests.post(
                f"{url}/get_lora", json={"session_id": session_id}, timeout=60
            ).json()
            results["lora_filename"] = lora["lora_filename"]
            results["lora_bytes"] = len(base64.b64decode(lora["lora_base64"]))

            timings = {}
            for label, extra in [
                ("no_lora", {}),
                ("lora", {"use_lora": True, "session_id": str(session_id)}),
            ]:
                runs = []
                for _ in range(3):
                    t0 = time.monotonic()
                    response = requests.post(f"{url}/txt2img", json={**body, **extra}, timeout=900)
                    assert response.ok, response.text
                    runs.append(round(time.monotonic() - t0, 2))
                    image = Image.open(
                        io.BytesIO(base64.b64decode(response.json()["images_base64"][0]))
                    )
                    assert image.size == (1024, 1024)
                timings[label] = runs
            results["txt2img_1024_s"] = timings
            response = requests.post(f"{url}/txt2img", json={**body, "num_images": 2}, timeout=900)
            results["txt2img_batch2_images"] = len(response.json()["images_base64"])
    finally:
        results["serve_exit_code"] = service.exit_code
        (args.out / "service_check.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
