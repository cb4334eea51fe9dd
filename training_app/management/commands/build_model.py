"""`manage.py build_model --preset tiny|sdxl-random`: write a random-weight model pair."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from sdxl_engine.errors import EngineError
from sdxl_engine.source import RANDOM_PRESETS


class Command(BaseCommand):
    help = (
        "Writes the random-weight SDXL Base + Refiner pair that the tests (tiny) and GPU "
        "benchmarks (sdxl-random) use, in diffusers format, where the workers look for it "
        "(<model cache>/<preset>/base and refiner) or under --out. A pair already there is "
        "kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--preset", choices=sorted(RANDOM_PRESETS), required=True)
        parser.add_argument("--out", type=Path, help="folder to write (default: model cache)")
        parser.add_argument(
            "--device",
            choices=["cpu", "cuda"],
            default="cpu",
            help="where to initialise the weights (cuda is much faster for sdxl-random; "
            "its weights are then saved in float16)",
        )
        parser.add_argument("--seed", type=int, default=0)

    def handle(
        self,
        *args: object,
        preset: str,
        out: Path | None,
        device: str,
        seed: int,
        **options: object,
    ) -> None:
        import torch

        from sdxl_engine.generation.builder import BUILD_STEPS, build_random_pipelines

        if device == "cuda" and not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA GPU here")
        folder = out or settings.MODEL_CACHE_DIR / preset
        started: list[str] = []
        with tqdm(total=BUILD_STEPS, desc=f"building {preset}", disable=None) as bar:

            def step(what: str) -> None:
                if started:  # the step before this one is done
                    bar.update(1)
                started.append(what)
                bar.set_postfix_str(what)

            try:
                base, refiner = build_random_pipelines(
                    RANDOM_PRESETS[preset],
                    folder,
                    seed=seed,
                    dtype=torch.float16 if device == "cuda" else None,
                    device=device,
                    on_step=step,
                )
            except (EngineError, OSError) as error:
                raise CommandError(f"could not build {preset}: {error}") from None
            bar.update(BUILD_STEPS - len(started) + bool(started))
        self.stdout.write(f"{preset}: base {base}")
        self.stdout.write(f"{preset}: refiner {refiner}")
