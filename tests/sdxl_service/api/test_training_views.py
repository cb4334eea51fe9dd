import base64
import hashlib
import inspect
import io
import json
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from rest_framework.fields import empty
from safetensors.torch import load

from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.parameters import (
    DEFAULT_LORA_SCALE,
    GENERATION_DEFAULTS,
    GenerationParams,
    LoraChoice,
    TrainingParams,
    field_names,
    training_params,
)
from sdxl_service.api.generation import serializers as generation_serializers
from sdxl_service.api.training.serializers import TrainLoraSerializer
from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import TrainingImage
from tests.helpers import b64, image_bytes, images_close, lora_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation, TrainingRun
from training_app.services import runs as run_services
from training_app.services.generations.requests import GenerationRequest
from training_app.services.loras import lora_upload

pytestmark = pytest.mark.django_db


def test_train_lora_starts_with_string_id_and_conflicts_while_active(api, session):
    response = api.post("/train_lora", {"session_id": str(session.pk)}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "started"
    assert_error(
        api.post("/train_lora", {"session_id": session.pk}, format="json"), 409, "already training"
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 100_001}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 5.0}, "steps"),
        ({"steps": "5.5"}, "steps"),
        ({"steps": [5]}, "steps"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1001}, "epochs"),
        ({"rank": 0}, "rank"),
        ({"rank": 1000}, "rank"),
        ({"rank": 4.0}, "rank"),
        ({"learning_rate": 5}, "learning_rate"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"learning_rate": True}, "learning_rate"),
        ({"learning_rate": "nan"}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"batch_size": "many"}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 65}, "batch_size"),
        ({"resolution": 100}, "resolution"),
        ({"resolution": 520}, "resolution: must be a multiple of 64"),
        ({"resolution": 4096}, "resolution"),
        ({"resolution": 0}, "resolution"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": False}, "seed"),
        ({"steps": 5, "epochs": 1}, "steps or epochs"),
        ({"lr_scheduler": "warp"}, "lr_scheduler"),
        ({"lr_scheduler": 1}, "lr_scheduler"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps"),
        ({"lr_warmup_steps": 1.5}, "lr_warmup_steps"),
        # With epochs the original recipe's constant rate applies: no warm-up.
        ({"lr_warmup_steps": 10, "epochs": 2}, "lr_warmup_steps: needs lr_scheduler"),
        ({"lr_warmup_steps": 10, "recipe": "original"}, "lr_warmup_steps: needs lr_scheduler"),
        ({"lr_warmup_steps": 10, "lr_scheduler": "constant"}, "lr_warmup_steps: needs"),
        ({"min_snr_gamma": -1}, "min_snr_gamma"),
        ({"min_snr_gamma": True}, "min_snr_gamma"),
        ({"min_snr_gamma": 101}, "min_snr_gamma"),
        ({"noise_offset": 1.5}, "noise_offset"),
        ({"noise_offset": "dark"}, "noise_offset"),
        ({"trigger": ""}, "trigger"),
        ({"trigger": "   "}, "trigger"),
        ({"trigger": 7}, "trigger"),
        ({"trigger": "x" * 101}, "trigger"),
        ({"caption_dropout": 1.01}, "caption_dropout"),
        ({"caption_dropout": -0.1}, "caption_dropout"),
        ({"caption_dropout": False}, "caption_dropout"),
        ({"recipe": "fast"}, "recipe"),
        ({"recipe": None}, "recipe"),
        ({"enable_bucket": "maybe"}, "enable_bucket"),
        ({"enable_bucket": 2}, "enable_bucket"),
        ({"train_text_encoder": "yes please"}, "train_text_encoder"),
        ({"text_encoder_lr": 1e-5}, "text_encoder_lr: needs train_text_encoder"),
        ({"text_encoder_lr": 0, "train_text_encoder": True}, "text_encoder_lr"),
        ({"text_encoder_lr": 1, "train_text_encoder": True}, "text_encoder_lr"),
        ({"masked_loss": "maybe"}, "masked_loss"),
        ({"use_alpha_mask": 1.5}, "use_alpha_mask"),
        ({"background_weight": 1.5, "masked_loss": True}, "background_weight"),
        ({"background_weight": -0.1, "masked_loss": True}, "background_weight"),
        ({"background_weight": "nan", "masked_loss": True}, "background_weight"),
        ({"background_weight": 0.5}, "background_weight: needs masked_loss"),
        ({"use_alpha_mask": True, "masked_loss": False}, "masked_loss: use_alpha_mask implies"),
        # The session's one image has no mask.
        ({"masked_loss": True}, "masked_loss needs a mask for at least one image"),
        ({"prior_preservation_weight": -0.1, "trigger": "sks"}, "prior_preservation_weight"),
        ({"prior_preservation_weight": 10.5, "trigger": "sks"}, "prior_preservation_weight"),
        ({"prior_preservation_weight": "inf", "trigger": "sks"}, "prior_preservation_weight"),
        ({"prior_preservation_weight": True, "trigger": "sks"}, "prior_preservation_weight"),
        ({"class_prompt": "a photo"}, "class_prompt: needs prior_preservation_weight"),
        ({"class_prompt": "a photo", "prior_preservation_weight": 0}, "class_prompt: needs"),
        ({"class_prompt": "  ", "prior_preservation_weight": 1}, "class_prompt"),
        ({"class_prompt": 7, "prior_preservation_weight": 1}, "class_prompt"),
        ({"class_prompt": "x" * 2001, "prior_preservation_weight": 1}, "class_prompt"),
        # Without a trigger the captions are what the LoRA learns: no class in them.
        ({"prior_preservation_weight": 1}, "class_prompt: needed with prior_preservation_weight"),
        ({"eval_holdout": -1}, "eval_holdout"),
        ({"eval_holdout": 0.5}, "eval_holdout"),
        # The session has one image: it must train.
        ({"eval_holdout": 1}, "eval_holdout: 1 of the session's 1 images would leave none"),
    ],
)
def test_train_lora_validates_parameters(api, session, body, field):
    assert_error(
        api.post("/train_lora", {"session_id": session.pk, **body}, format="json"), 400, field
    )
    assert not TrainingRun.objects.exists()


def test_train_lora_passes_the_recipe_options_to_the_run(api, session):
    recipe = {
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 10,
        "min_snr_gamma": 5,
        "noise_offset": 0.05,
        "trigger": "ohwx woman",
        "caption_dropout": 0.05,
    }
    response = api.post("/train_lora", {"session_id": session.pk, **recipe}, format="json")
    assert response.status_code == 200
    recorded = TrainingRun.objects.get().parameters
    assert recorded == {**recorded, **recipe, "min_snr_gamma": 5.0}
    assert recorded["recipe"] == "service"


def test_a_body_with_only_the_session_records_the_whole_service_recipe(api, session, settings):
    settings.SDXL_MODEL_PRESET = "hub"  # real SDXL: the recipe uncapped (tiny: 100 steps)
    for number in range(9):  # ten images in all
        session_services.session_image_add(session.pk, image_bytes(), f"photo {number}")

    response = api.post("/train_lora", {"session_id": session.pk}, format="json")

    assert response.status_code == 200
    assert TrainingRun.objects.get().parameters == asdict(training_params({}, 10))
    recorded = TrainingParams(**TrainingRun.objects.get().parameters)
    assert recorded.epochs * 10 >= 1000  # image-views: every image, every epoch
    assert (recorded.rank, recorded.enable_bucket, recorded.recipe) == (32, True, "service")


@pytest.mark.one_pass
def test_only_a_session_id_after_portraits_and_landscapes_trains_1000_views_in_buckets(
    api, tmp_path
):
    """What a new client gets: photos of two shapes, /train_lora with only session_id."""
    session_id = api.get("/create_session").json()["session_id"]
    for number, size in enumerate([(64, 96)] * 4 + [(96, 64)] * 4):
        body = {
            "session_id": session_id,
            "image_base64": b64(image_bytes(size=size)),
            "prompt": f"photo {number}",
        }
        assert api.post("/post_session_image", body, format="json").status_code == 200

    assert api.post("/train_lora", {"session_id": session_id}, format="json").status_code == 200
    run_services.training_run_execute(TrainingRun.objects.get().pk)

    status = api.post("/train_status", {"session_id": session_id}, format="json").json()
    assert status["status"] == "completed", status
    lora = api.post("/get_lora", {"session_id": session_id}, format="json").json()
    (tmp_path / "lora.safetensors").write_bytes(base64.b64decode(lora["lora_base64"]))
    header = read_lora_metadata(tmp_path / "lora.safetensors")
    assert header["sdxl_service.recipe"] == "service"
    # Real SDXL: 8 images x 188 epochs, 1504 image-views, in 376 steps of one bucket's 4
    # images; the tiny model (these tests') caps the length left out at 100 steps.
    assert training_params({}, 8).epochs == 188
    assert header["sdxl_service.steps"] == "100"
    assert header["sdxl_service.buckets"] == "48x80:4,80x48:4"  # portraits, landscapes
    assert header["sdxl_service.rank"] == "32"


def test_text_encoder_training_is_recorded_with_its_rate(api, session):
    body = {"session_id": session.pk, "train_text_encoder": True, "text_encoder_lr": 1e-5}
    assert api.post("/train_lora", body, format="json").status_code == 200
    recorded = TrainingRun.objects.get().parameters
    assert (recorded["train_text_encoder"], recorded["text_encoder_lr"]) == (True, 1e-5)


def test_a_masked_run_trains_on_the_sessions_mask_and_records_it(api, session, tmp_path):
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (0, 0, 24, 40))  # the left half is the subject
    image = TrainingImage.objects.get(group__session=session)
    session_services.training_image_mask_store(session.pk, image.pk, mask)
    masked = {"masked_loss": True, "background_weight": 0.1}
    body = {"session_id": session.pk, "steps": 1, "resolution": 64, **masked}

    response = api.post("/train_lora", body, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["recipe"] | masked == response.json()["recipe"]
    assert response.json()["recipe"]["use_alpha_mask"] is False
    assert TrainingRun.objects.get().parameters | masked == TrainingRun.objects.get().parameters
    run_services.training_run_execute(TrainingRun.objects.get().pk)
    status = api.post("/train_status", {"session_id": session.pk}, format="json").json()
    assert status["status"] == "completed", status
    lora = api.post("/get_lora", {"session_id": session.pk}, format="json").json()
    (tmp_path / "lora.safetensors").write_bytes(base64.b64decode(lora["lora_base64"]))
    header = read_lora_metadata(tmp_path / "lora.safetensors")
    assert header["sdxl_service.masked_loss"] == "True"
    assert header["sdxl_service.background_weight"] == "0.1"


def test_the_alpha_mask_needs_no_mask_file_and_implies_masked_loss(api, session):
    response = api.post(
        "/train_lora",
        {"session_id": session.pk, "alpha_mask": True},  # kohya's name
        format="json",
    )
    assert_error(response, 400, 'alpha_mask: unknown field; did you mean "use_alpha_mask"?')

    response = api.post(
        "/train_lora", {"session_id": session.pk, "use_alpha_mask": True}, format="json"
    )

    assert response.status_code == 200, response.content
    recorded = TrainingRun.objects.get().parameters
    assert (recorded["use_alpha_mask"], recorded["masked_loss"]) == (True, True)


def test_prior_preservation_trains_and_is_echoed_recorded_and_in_the_header(api, session):
    body = {"session_id": session.pk, "steps": 2, "trigger": "ohwx"}
    prior = {"prior_preservation_weight": 0.5, "class_prompt": "a photo of a square"}

    response = api.post("/train_lora", {**body, **prior}, format="json")

    assert response.status_code == 200
    assert response.json()["recipe"] == {**response.json()["recipe"], **prior}
    run = TrainingRun.objects.get()
    assert run.parameters == {**run.parameters, **prior}
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.COMPLETED
    header = run.artifact.metadata
    assert header["sdxl_service.prior_preservation_weight"] == "0.5"
    assert json.loads(header["sdxl_service.class_prompts"]) == ["a photo of a square"]
    # Left out, the class prompt is the caption without the trigger ("a red square").
    api.post("/train_lora", {**body, "prior_preservation_weight": 1}, format="json")
    derived = TrainingRun.objects.latest("pk")
    assert derived.parameters["class_prompt"] is None
    run_services.training_run_execute(derived.pk)
    derived.refresh_from_db()
    assert json.loads(derived.artifact.metadata["sdxl_service.class_prompts"]) == ["a red square"]


def test_an_explicit_epochs_1_records_the_original_recipe(api, session):
    api.post("/train_lora", {"session_id": session.pk, "epochs": 1}, format="json")
    assert TrainingRun.objects.get().parameters == asdict(TrainingParams(recipe="original"))


def test_train_lora_passes_parameters_to_the_run(api, session):
    api.post(
        "/train_lora",
        {
            "session_id": session.pk,
            "steps": 7,
            "rank": 8,
            "learning_rate": 0.001,
            "resolution": 512,
            "seed": 3,
        },
        format="json",
    )
    assert TrainingRun.objects.get().parameters == asdict(
        TrainingParams(
            steps=7,
            epochs=None,
            rank=8,
            learning_rate=0.001,
            resolution=512,
            seed=3,
            recipe="original",
        )
    )


def test_train_status_shapes(api, session):
    def status():
        return api.post("/train_status", {"session_id": session.pk}, format="json").json()

    assert status() == {"status": "none", "progress": 0}
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    queued = status()
    assert (queued["status"], queued["progress"], queued["queued"]) == ("in-progress", 0, True)
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    final = {"step": 1, "lora_filename": "lora_1.safetensors", "eval_loss": run.eval_loss}
    assert status() == {
        "status": "completed",
        "progress": 100,
        "lora": "lora_1.safetensors",
        "samples": [],
        # The final LoRA, scored (no samples in the original recipe: no similarity).
        "checkpoints": [{**final, "similarity": None}],
        "best_checkpoint": final,
        "loss_history": [{"step": 1, "loss": run.last_loss}],
        "resumed_from_step": None,
        "init_lora": None,
    }
    assert_error(api.post("/train_status", {"session_id": 999}, format="json"), 404, "not found")


def test_upload_lora_as_a_multipart_file_stores_the_same_as_base64(api, session):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from training_app.models import LoraArtifact

    data = lora_bytes(fill=0.01)
    response = api.post(
        "/upload_lora",
        {"session_id": str(session.pk), "lora": SimpleUploadedFile("x.safetensors", data)},
        format="multipart",
    )
    assert response.json() == {
        "status": "success",
        "lora_filename": "lora_1.safetensors",
        "iteration": 1,
    }
    named = api.post(
        "/upload_lora",
        {
            "session_id": str(session.pk),
            "lora": SimpleUploadedFile("x.safetensors", data),
            "filename": "mine.safetensors",
        },
        format="multipart",
    ).json()
    assert named["lora_filename"] == "mine.safetensors"
    assert {lora.sha256 for lora in LoraArtifact.objects.all()} == {
        hashlib.sha256(data).hexdigest()
    }
    refused = api.post(
        "/upload_lora",
        {"session_id": str(session.pk), "lora": SimpleUploadedFile("x.safetensors", b"junk")},
        format="multipart",
    )
    assert_error(refused, 400, "lora is not a usable LoRA file")
    missing = api.post("/upload_lora", {"session_id": str(session.pk)}, format="multipart")
    assert_error(missing, 400, "lora")
    assert LoraArtifact.objects.count() == 2


def test_get_and_upload_lora(api, session):
    assert_error(
        api.post("/get_lora", {"session_id": session.pk}, format="json"),
        404,
        "Requested LoRA not found",
    )
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    body = api.post("/get_lora", {"session_id": str(session.pk)}, format="json").json()
    assert body["session_id"] == str(session.pk)
    assert body["lora_filename"] == "lora_1.safetensors"
    lora = base64.b64decode(body["lora_base64"])
    response = api.post(
        "/upload_lora",
        {"session_id": session.pk, "lora_base64": b64(lora), "filename": "mine.safetensors"},
        format="json",
    )
    assert response.json() == {
        "status": "success",
        "lora_filename": "mine.safetensors",
        "iteration": 2,
    }
    latest = api.post("/get_lora", {"session_id": session.pk}, format="json").json()
    assert latest["lora_filename"] == "mine.safetensors"
    assert_error(
        api.post(
            "/upload_lora",
            {"session_id": session.pk, "lora_base64": b64(lora), "filename": "mine.safetensors"},
            format="json",
        ),
        409,
        "already exists",
    )
    assert_error(
        api.post("/upload_lora", {"session_id": session.pk, "lora_base64": "!!"}, format="json"),
        400,
        "lora_base64",
    )


def test_upload_of_an_sd_scripts_locon_with_text_encoders_is_stored_and_listed(
    api, session, tmp_path
):
    from tests import community_loras

    folder = community_loras.packaged_model_folder("tiny", tmp_path / "tiny")
    locon = community_loras.write_kohya_locon(tmp_path / "locon.safetensors", folder)
    response = api.post(
        "/upload_lora",
        {"session_id": session.pk, "lora_base64": b64(locon.read_bytes())},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["lora_filename"] == "lora_1.safetensors"
    body = api.post("/get_lora", {"session_id": session.pk}, format="json").json()
    stored = load(base64.b64decode(body["lora_base64"]))
    assert {key.split(".")[0] for key in stored} == {"unet", "text_encoder", "text_encoder_2"}
    assert "unet.down_blocks.0.resnets.0.conv1.lora.down.weight" in stored
    # And out again as kohya, text encoders included.
    kohya = api.post(
        "/get_lora", {"session_id": session.pk, "format": "kohya"}, format="json"
    ).json()
    keys = load(base64.b64decode(kohya["lora_base64"])).keys()
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}


@pytest.mark.parametrize(
    ("writer", "kind"), [("write_loha", "LoHa"), ("write_lokr", "LoKr")], ids=["LoHa", "LoKr"]
)
def test_upload_of_a_loha_or_lokr_is_400_naming_it_and_stores_nothing(
    api, session, tmp_path, writer, kind
):
    from tests import community_loras

    folder = community_loras.packaged_model_folder("tiny", tmp_path / "tiny")
    path = getattr(community_loras, writer)(tmp_path / "x.safetensors", folder)
    assert_error(
        api.post(
            "/upload_lora",
            {"session_id": session.pk, "lora_base64": b64(path.read_bytes())},
            format="json",
        ),
        400,
        f"{kind} is not supported",
    )
    assert_error(
        api.post("/get_lora", {"session_id": session.pk}, format="json"),
        404,
        "Requested LoRA not found",
    )
    from sessions_app import storage

    assert not list(storage.session_dir(session.pk).glob("*.safetensors"))


def test_get_lora_as_kohya_and_upload_it_back(api, session):
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    stored = api.post("/get_lora", {"session_id": session.pk}, format="json").json()
    body = api.post(
        "/get_lora", {"session_id": session.pk, "iteration": 1, "format": "kohya"}, format="json"
    ).json()
    assert (body["lora_filename"], body["iteration"], body["format"]) == (
        "lora_1.safetensors",
        1,
        "kohya",
    )
    kohya = base64.b64decode(body["lora_base64"])
    assert body["sha256"] == hashlib.sha256(kohya).hexdigest() != stored["sha256"]
    assert all(key.startswith("lora_unet_") for key in load(kohya))

    response = api.post(
        "/upload_lora", {"session_id": session.pk, "lora_base64": b64(kohya)}, format="json"
    )
    assert response.json()["lora_filename"] == "lora_2.safetensors"
    again = api.post("/get_lora", {"session_id": session.pk, "iteration": 2}, format="json")
    # Stored in the trainer's form: the same tensors as the trained file.
    first = load(base64.b64decode(stored["lora_base64"]))
    second = load(base64.b64decode(again.json()["lora_base64"]))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert_error(
        api.post("/get_lora", {"session_id": session.pk, "format": "ckpt"}, format="json"),
        400,
        "format",
    )


def test_cancel_training(api, session):
    assert_error(
        api.post("/cancel_training", {"session_id": session.pk}, format="json"), 409, "no queued"
    )
    assert_error(api.post("/cancel_training", {"session_id": 999}, format="json"), 404, "not found")
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    response = api.post("/cancel_training/", {"session_id": str(session.pk)}, format="json")
    assert response.json() == {
        "status": "cancelled",
        "session_id": str(session.pk),
        "run_id": run.pk,
    }
    status = api.post("/train_status", {"session_id": session.pk}, format="json").json()
    assert status == {"status": "cancelled", "message": "training was cancelled"}
    listed = api.get("/list_sessions").json()["sessions"]
    assert listed[0]["training"] == {"status": "cancelled", "message": "training was cancelled"}
    detail = api.get(f"/sessions/{session.pk}").json()
    assert [(r["status"], r["message"]) for r in detail["runs"]] == [
        ("cancelled", "training was cancelled")
    ]
    # Cancelling is over: the session trains again.
    response = api.post("/train_lora", {"session_id": str(session.pk)}, format="json")
    assert response.status_code == 200


def test_txt2img_answers_seed_lora_and_duration(api, session, generations_in_process):
    from training_app.models import LoraArtifact

    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    small = {"prompt": "x", "height": 64, "width": 64, "steps": 5}

    plain = api.post("/txt2img", {**small, "num_images": 2}, format="json").json()
    with_lora = api.post(
        "/txt2img",
        {**small, "seed": 42, "use_lora": True, "session_id": str(session.pk)},
        format="json",
    ).json()

    assert len(plain["images_base64"]) == 2 and plain["lora"] is None
    assert isinstance(plain["seed"], int) and isinstance(plain["duration_ms"], int)
    artifact = LoraArtifact.objects.get()
    assert with_lora["seed"] == 42
    assert with_lora["lora"] == {"filename": "lora_1.safetensors", "sha256": artifact.sha256}
    assert with_lora["duration_ms"] >= 0


def test_txt2img_without_worker_is_503_json(api):
    assert_error(api.post("/txt2img", {"prompt": "x"}, format="json"), 503, "no generation worker")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": " "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": 7}, "prompt"),  # DRF would take it as "7"; a JSON number is no prompt
        ({"prompt": "x", "negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"prompt": "x", "height": 100}, "height: must be a multiple of 8"),
        ({"prompt": "x", "height": 56}, "height"),
        ({"prompt": "x", "width": 100000}, "width"),
        ({"prompt": "x", "width": 2056}, "width"),
        ({"prompt": "x", "width": 512.0}, "width"),
        ({"prompt": "x", "width": True}, "width"),
        ({"prompt": "x", "num_images": 0}, "num_images"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
        ({"prompt": "x", "num_images": 1.5}, "num_images"),
        ({"prompt": "x", "num_images": True}, "num_images"),
        ({"prompt": "x", "steps": 4}, "steps"),
        ({"prompt": "x", "steps": 1000}, "steps"),
        ({"prompt": "x", "steps": 20.0}, "steps"),
        ({"prompt": "x", "guidance_scale": "loud"}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": -0.5}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": True}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": "Infinity"}, "guidance_scale"),
        ({"prompt": "x", "lora_scale": 5}, "lora_scale"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "use_lora": "perhaps"}, "use_lora"),
        ({"prompt": "x", "use_lora": True}, "session_id"),
        ({"prompt": "x", "use_lora": True, "session_id": "1", "iteration": 2**31}, "iteration"),
        ({"prompt": "x", "use_lora": True, "session_id": "1", "iteration": 0}, "iteration"),
    ],
)
def test_txt2img_validates_before_anything_else(api, body, field):
    response = api.post("/txt2img", body, format="json")
    assert_error(response, 400, field)
    assert response.json()["message"].startswith(field.split(":")[0])
    assert not Generation.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"loras": {"session_id": "1"}}, "loras"),
        ({"loras": [{"session_id": "1"}] * 5}, "loras"),
        ({"loras": [{"iteration": 1}]}, "loras"),
        ({"loras": [{"session_id": "1", "scale": 5}]}, "loras"),
        (
            {"loras": [{"session_id": "1", "iteration": 1, "lora_filename": "a.safetensors"}]},
            "loras",
        ),
        ({"loras": [{"session_id": "1"}], "use_lora": True, "session_id": "1"}, "loras"),
        ({"init_image_base64": "not base64!"}, "init_image_base64"),
        ({"init_image_base64": b64(b"not an image")}, "init_image_base64"),
        ({"strength": 0.5}, "strength"),
        ({"init_image_base64": b64(image_bytes("PNG", (64, 64))), "strength": 0}, "strength"),
        ({"init_image_base64": b64(image_bytes("PNG", (64, 64))), "strength": 1.5}, "strength"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "png", "quality": 80}, "quality"),
        ({"output_format": "jpeg", "quality": 0}, "quality"),
        ({"quality": 90}, "quality"),
    ],
)
def test_txt2img_new_fields_are_checked_before_anything_is_recorded(
    api, generations_in_process, body, field
):
    response = api.post("/txt2img", {"prompt": "x", **body}, format="json")
    assert_error(response, 400, field)
    assert response.json()["message"].startswith(field)
    assert not Generation.objects.exists()


def test_txt2img_a_missing_lora_in_loras_is_404_naming_it(api, session, generations_in_process):
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    loras = [{"session_id": str(session.pk)}, {"session_id": str(session.pk), "iteration": 7}]

    response = api.post("/txt2img", {"prompt": "x", "loras": loras}, format="json")

    assert_error(response, 404, f"iteration 7 of session {session.pk}")
    assert not Generation.objects.exists()


def test_txt2img_with_two_loras_img2img_and_jpeg_answers_what_it_used(
    api, session, generations_in_process
):
    from sdxl_engine.image_output import read_infotext
    from training_app.models import LoraArtifact

    for seed in (1, 2):
        run = run_services.training_run_start(
            session.pk, {"steps": 1, "resolution": 64, "learning_rate": 0.05, "seed": seed}
        )
        run_services.training_run_execute(run.pk)
    first, second = LoraArtifact.objects.order_by("number")
    body = {
        "prompt": "a red square",
        "height": 64,
        "width": 64,
        "steps": 5,
        "seed": 3,
        "num_images": 2,
        "loras": [
            {"session_id": str(session.pk), "iteration": 1, "scale": 0.7},
            {"session_id": str(session.pk), "lora_filename": "lora_2.safetensors", "scale": -0.3},
        ],
        "init_image_base64": b64(image_bytes("PNG", (64, 64), "red")),
        "strength": 0.6,
        "refiner": "none",
        "output_format": "jpeg",
        "quality": 85,
    }

    answer = api.post("/txt2img", body, format="json").json()

    assert answer["seeds"] == [3, 4] and answer["seed"] == 3
    assert answer["loras"] == [
        {
            "session_id": str(session.pk),
            "filename": first.filename,
            "sha256": first.sha256,
            "scale": 0.7,
        },
        {
            "session_id": str(session.pk),
            "filename": second.filename,
            "sha256": second.sha256,
            "scale": -0.3,
        },
    ]
    assert answer["lora"] == {"filename": first.filename, "sha256": first.sha256}
    assert (answer["refiner"], answer["refiner_switch"], answer["strength"]) == ("none", None, 0.6)
    assert (answer["output_format"], answer["scheduler"]) == ("jpeg", None)
    images = [base64.b64decode(image) for image in answer["images_base64"]]
    assert [Image.open(io.BytesIO(image)).format for image in images] == ["JPEG", "JPEG"]
    text = read_infotext(images[1])
    assert text.startswith("a red square <lora:lora_1:0.7> <lora:lora_2:-0.3>\n")
    assert "Seed: 4," in text and "Denoising strength: 0.6" in text and "Refiner" not in text
    # Image 1 alone, by its own seed.
    alone = api.post(
        "/txt2img", {**body, "num_images": 1, "seed": answer["seeds"][1]}, format="json"
    ).json()
    again = base64.b64decode(alone["images_base64"][0])
    assert read_infotext(again) == text
    # The same pixels up to the last bits a batch of 2 sums in another order than one.
    assert images_close([Image.open(io.BytesIO(again))], [Image.open(io.BytesIO(images[1]))])


def test_txt2img_answers_the_refiner_policy_and_switch(api, generations_in_process):
    small = {"prompt": "x", "height": 64, "width": 64, "steps": 5}
    default = api.post("/txt2img", small, format="json").json()
    chosen = api.post("/txt2img", {**small, "refiner_switch": 0.6}, format="json").json()
    assert (default["refiner"], default["refiner_switch"]) == ("ensemble", 0.8)
    assert (chosen["refiner"], chosen["refiner_switch"]) == ("ensemble", 0.6)
    assert default["loras"] == [] and default["strength"] is None
    assert default["output_format"] == "png"


@pytest.mark.parametrize("name", ["heun", "Euler", "", 1, True])
def test_txt2img_unknown_scheduler_is_400_listing_the_valid_ones(api, name):
    response = api.post("/txt2img", {"prompt": "x", "scheduler": name}, format="json")

    assert_error(response, 400, "scheduler")
    assert response.json()["message"] == (
        "scheduler: must be one of: "
        "euler, euler_a, dpmpp_2m, dpmpp_2m_karras, dpmpp_sde_karras, ddim, unipc"
    )
    assert not Generation.objects.exists()


def test_txt2img_with_a_scheduler_names_its_sampler_in_the_pngs(api, generations_in_process):
    small = {"prompt": "x", "height": 64, "width": 64, "steps": 5, "seed": 9}

    chosen = api.post("/txt2img", {**small, "scheduler": "dpmpp_2m_karras"}, format="json")
    plain = api.post("/txt2img", {**small, "scheduler": None}, format="json")

    assert chosen.status_code == plain.status_code == 200
    texts = [
        Image.open(io.BytesIO(base64.b64decode(response.json()["images_base64"][0]))).text
        for response in (chosen, plain)
    ]
    assert "Steps: 5, Sampler: DPM++ 2M Karras, CFG scale: " in texts[0]["parameters"]
    assert json.loads(texts[0]["sdxl_service"])["scheduler"] == "dpmpp_2m_karras"
    assert "Sampler" not in texts[1]["parameters"]
    assert json.loads(texts[1]["sdxl_service"])["scheduler"] is None
    first, second = Generation.objects.order_by("pk")
    assert first.parameters["scheduler"] == "dpmpp_2m_karras"
    assert "scheduler" not in second.parameters


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"refiner": "both"}, "refiner: must be one of: ensemble, none"),
        ({"refiner": 1}, "refiner: must be one of: ensemble, none"),
        ({"refiner_switch": 0.4}, "refiner_switch: "),
        ({"refiner_switch": 1.0}, "refiner_switch: "),
        ({"refiner_switch": 1.5}, "refiner_switch: "),
        ({"refiner_switch": "high"}, "refiner_switch: "),
        ({"refiner_switch": True}, "refiner_switch: "),
        (
            {"refiner": "none", "refiner_switch": 0.8},
            'refiner_switch: applies only when refiner is "ensemble"',
        ),
    ],
)
def test_txt2img_bad_refiner_policy_is_400(api, fields, message):
    response = api.post("/txt2img", {"prompt": "x", **fields}, format="json")

    assert_error(response, 400, "refiner")
    assert response.json()["message"].startswith(message)
    assert not Generation.objects.exists()


def test_txt2img_without_the_refiner_leaves_it_out_of_the_pngs(api, generations_in_process):
    small = {"prompt": "x", "height": 64, "width": 64, "steps": 5, "seed": 9}

    alone = api.post("/txt2img", {**small, "refiner": "none"}, format="json")
    plain = api.post("/txt2img", small, format="json")

    assert alone.status_code == plain.status_code == 200
    assert set(alone.json()) == set(plain.json()) == TXT2IMG_RESPONSE_KEYS
    texts = [
        Image.open(io.BytesIO(base64.b64decode(response.json()["images_base64"][0]))).text
        for response in (alone, plain)
    ]
    assert "Refiner" not in texts[0]["parameters"]
    record = json.loads(texts[0]["sdxl_service"])
    assert record["refiner"] is None and record["refiner_switch_at"] is None
    assert ", Refiner: " in texts[1]["parameters"]
    assert ", Refiner switch at: 0.8" in texts[1]["parameters"]
    assert json.loads(texts[1]["sdxl_service"])["refiner_switch_at"] == 0.8
    first, second = Generation.objects.order_by("pk")
    assert first.parameters["refiner"] == "none" and "refiner_switch" not in first.parameters
    assert "refiner" not in second.parameters and "refiner_switch" not in second.parameters


def test_train_lora_fields_are_the_engines_training_params():
    fields = set(TrainLoraSerializer().fields)
    # init_lora names the run's parent, a file: recorded on the run, not in its TrainingParams.
    not_params = {"session_id", "webhook_url", "webhook_events", "init_lora"}
    assert fields - not_params == field_names(TrainingParams)


TXT2IMG_RESPONSE_KEYS = {
    "images_base64",
    "generation_id",
    "image_urls",
    "seed",
    "seeds",
    "lora",
    "loras",
    "scheduler",
    "refiner",
    "refiner_switch",
    "strength",
    "output_format",
    "duration_ms",
    "parameters",  # issue 25: what it ran with (its size filled)
    "faces_redone",  # issue 28: per image, the faces the face detail pass redid
    "prompt_syntax",  # issue 28: how the prompts were read
}


def test_txt2img_fields_are_the_engines_generation_params():
    """Adding a generation field touches GenerationParams and this serializer alike."""
    body = set(generation_serializers.Txt2ImgSerializer().fields)
    renamed = generation_serializers.TXT2IMG_RENAMED
    request_only = set(generation_serializers.TXT2IMG_REQUEST_FIELDS)
    assert {renamed.get(name, name) for name in body - request_only} == field_names(
        GenerationParams
    )
    # The rest is the service's request (but how to answer) or the API's.
    assert request_only - {"response_format", "async"} == (
        field_names(GenerationRequest) - field_names(GenerationParams) - {"caller"}
    )


def test_txt2img_defaults_are_the_engines_and_the_services():
    """The body's defaults are GenerationParams' (what generate() renders), and so are the
    service's; a field without one is optional and left out as None (or no LoRAs)."""
    fields = generation_serializers.Txt2ImgSerializer().fields
    body_name = {param: name for name, param in generation_serializers.TXT2IMG_RENAMED.items()}
    request = GenerationRequest()
    for name in field_names(GenerationParams) - {"prompt"}:
        field = fields[body_name.get(name, name)]
        default = getattr(GENERATION_DEFAULTS, name)
        assert getattr(request, name) == default
        if field.default is empty:
            assert not field.required and default in (None, ())
        else:
            assert field.default == default
    # A LoRA's scale is its AppliedLora's.
    scales = {
        fields["lora_scale"].default,
        generation_serializers.LoraChoiceSerializer().fields["scale"].default,
        request.lora_scale,
        LoraChoice(1).scale,
        inspect.signature(AppliedLora).parameters["scale"].default,
    }
    assert scales == {DEFAULT_LORA_SCALE}


@pytest.mark.parametrize("path", ["/train_lora", "/txt2img"])
def test_a_webhook_to_a_host_not_allowed_is_400_and_records_nothing(
    api, session, generation_worker, settings, path
):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    settings.SDXL_WEBHOOK_SECRET = "s"
    session_services.session_image_add(session.pk, image_bytes(), "red")
    body = {"session_id": str(session.pk), "webhook_url": "http://10.0.0.1/x"}
    if path == "/txt2img":
        body["prompt"] = "x"

    response = api.post(path, body, format="json")

    assert_error(response, 400, "webhook_url host 10.0.0.1 is not in SDXL_WEBHOOK_ALLOWED_HOSTS")
    assert not TrainingRun.objects.exists() and not Generation.objects.exists()
    unknown = api.post(path, {**body, "webhook_events": ["done"]}, format="json")
    assert_error(unknown, 400, "webhook_events")


def test_webhook_fields_are_recorded_on_the_run_and_the_generation(
    api, session, generation_worker, settings
):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = [".example.com"]
    settings.SDXL_WEBHOOK_SECRET = "s"
    session_services.session_image_add(session.pk, image_bytes(), "red")
    hook = {"webhook_url": "https://ci.example.com/hook", "webhook_events": ["progress"]}

    api.post("/train_lora", {"session_id": str(session.pk), "steps": 1, **hook}, format="json")
    api.post("/txt2img", {"prompt": "x", "async": True, **hook}, format="json")

    run, generation = TrainingRun.objects.get(), Generation.objects.get()
    assert (run.webhook_url, run.webhook_events) == (hook["webhook_url"], ["progress"])
    assert (generation.webhook_url, generation.webhook_events) == (
        hook["webhook_url"],
        ["progress"],
    )
    assert "webhook_url" not in run.parameters


def _train(api, session_id, **fields) -> dict:
    """/train_lora with `fields`, the run then executed here; the run's recipe."""
    response = api.post(
        "/train_lora",
        {"session_id": session_id, "steps": 2, "resolution": 64, "seed": 1, **fields},
        format="json",
    )
    assert response.status_code == 200, response.content
    run_services.training_run_execute(response.json()["run_id"])
    run = TrainingRun.objects.get(pk=response.json()["run_id"])
    assert run.status == "completed", run.error_message
    return response.json()["recipe"]


def test_train_lora_continues_a_lora_or_a_checkpoint_of_the_session(api, session):
    _train(api, session.pk, rank=8, checkpoint_every=1)
    folder = storage.session_dir(session.pk)
    parent_sha256 = hashlib.sha256((folder / "lora_1.safetensors").read_bytes()).hexdigest()

    recipe = _train(api, session.pk, init_lora={"iteration": 1})
    # The parent's rank (8), not the original recipe's 4.
    assert recipe["rank"] == 8
    recorded = {"lora_filename": "lora_1.safetensors", "iteration": 1, "sha256": parent_sha256}
    assert recipe["init_lora"] == recorded
    status = api.post("/train_status", {"session_id": session.pk}, format="json").json()
    assert status["lora"] == "lora_2.safetensors" and status["init_lora"] == recorded
    header = read_lora_metadata(folder / "lora_2.safetensors")
    assert header["sdxl_service.parent"] == "lora_1.safetensors"
    assert header["sdxl_service.parent_sha256"] == parent_sha256
    assert header["sdxl_service.total_steps_cumulative"] == "4"  # 2 + 2

    # A checkpoint, by the name the session lists (its run's id is the database's: not 1
    # on PostgreSQL, whose sequences tests do not reset): its step 1, then 2 more.
    checkpoints = api.get(f"/sessions/{session.pk}").json()["checkpoints"]
    checkpoint = next(entry["lora_filename"] for entry in checkpoints if entry["step"] == 1)
    assert checkpoint.endswith("_step1.safetensors")
    _train(api, session.pk, init_lora={"lora_filename": checkpoint})
    header = read_lora_metadata(folder / "lora_3.safetensors")
    assert header["sdxl_service.parent"] == checkpoint
    assert header["sdxl_service.total_steps_cumulative"] == "3"
    runs = api.get(f"/sessions/{session.pk}").json()["runs"]
    assert [run["init_lora"] and run["init_lora"]["iteration"] for run in runs] == [None, 1, None]


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"init_lora": {"iteration": 7}}, 400, "init_lora: Requested LoRA not found: session"),
        ({"init_lora": {"lora_filename": "x.safetensors"}}, 400, "has no LoRA x.safetensors"),
        ({"init_lora": {"iteration": 1}, "rank": 16}, 400, "rank 16 differs from the rank 2 of"),
        ({"init_lora": {"iteration": 1}, "train_text_encoder": True}, 200, ""),
        ({"init_lora": {}}, 400, "init_lora: give iteration or lora_filename"),
        ({"init_lora": {"iteration": 1, "lora_filename": "a.safetensors"}}, 400, "not both"),
        ({"init_lora": {"iteration": 1, "session_id": 2}}, 400, "init_lora.session_id: unknown"),
        ({"init_lora": 1}, 400, "init_lora: Invalid data. Expected a dictionary"),
        ({"network_weights": "lora_1.safetensors"}, 400, 'did you mean \\"init_lora\\"'),
    ],
)
def test_train_lora_init_lora_is_checked_before_anything_is_recorded(
    api, session, fields, status, message
):
    lora_upload(session.pk, lora_bytes(rank=2), None)  # lora_1, rank 2
    response = api.post("/train_lora", {"session_id": session.pk, **fields}, format="json")
    assert response.status_code == status, response.content
    assert message in response.content.decode()
    assert TrainingRun.objects.exists() == (status == 200)


def test_train_lora_refuses_another_sessions_lora(api, session):
    lora_upload(session.pk, lora_bytes(), None)
    other = session_services.session_create()
    session_services.session_image_add(other.pk, image_bytes(), "a blue square")
    assert_error(
        api.post(
            "/train_lora",
            {"session_id": other.pk, "init_lora": {"lora_filename": "lora_1.safetensors"}},
            format="json",
        ),
        400,
        f"session {other.pk} has no LoRA lora_1.safetensors",
    )
    assert not TrainingRun.objects.exists()
