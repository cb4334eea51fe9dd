"""Generations as jobs: /txt2img with "async": true, GET /generations/<id> and its images."""

import base64
import io

import pytest
from PIL import Image

from sdxl_engine.image_output import read_infotext
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation
from training_app.services.generations import batches, lifecycle

pytestmark = pytest.mark.django_db

SMALL = {"prompt": "a red square", "height": 64, "width": 64, "steps": 5}


def test_async_txt2img_answers_202_at_once_and_the_status_url_follows_the_job(
    api, generation_worker
):
    steps_seen = []
    answer = api.post(
        "/txt2img", {**SMALL, "async": True, "num_images": 2, "seed": 7}, format="json"
    )

    assert answer.status_code == 202
    body = answer.json()
    generation_id = body["generation_id"]
    assert body == {
        "generation_id": generation_id,
        "status": "queued",
        "status_url": f"/generations/{generation_id}",
        "queue_position": 1,
        "waiting_for": None,
        "queue_eta_seconds": 0,
    }
    queued = api.get(body["status_url"]).json()
    assert (queued["status"], queued["step"], queued["image_urls"]) == ("queued", 0, [])
    assert queued["seeds"] == [7, 8] and queued["parameters"]["num_images"] == 2

    # The worker's part, watching the row as a client polling the status would.
    original = batches._progress_recorder

    def watching(ids):
        record = original(ids)

        def both(done, total):
            record(done, total)
            row = api.get(body["status_url"]).json()
            steps_seen.append((row["status"], row["step"], row["total_steps"]))

        return both

    batches._progress_recorder = watching
    try:
        batches.generation_execute(generation_id)
    finally:
        batches._progress_recorder = original

    assert steps_seen[0] == ("running", 1, 5) and steps_seen[-1] == ("running", 5, 5)
    done = api.get(body["status_url"] + "/").json()
    assert done["status"] == "completed" and done["message"] is None
    assert done["image_urls"] == [
        f"/generations/{generation_id}/0.png",
        f"/generations/{generation_id}/1.png",
    ]
    for index, url in enumerate(done["image_urls"]):
        image = api.get(url)
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
        data = b"".join(image.streaming_content)
        assert f"Seed: {7 + index}," in read_infotext(data)
        assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_a_generation_in_error_answers_its_message(api, generation_worker):
    generation = api.post("/txt2img", {**SMALL, "async": True}, format="json").json()
    Generation.objects.filter(pk=generation["generation_id"]).update(
        status="error", error_message="the generation worker was lost"
    )

    body = api.get(generation["status_url"]).json()

    assert (body["status"], body["message"]) == ("error", "the generation worker was lost")
    assert body["image_urls"] == []


def test_txt2img_with_response_format_url_answers_urls_instead_of_images(
    api, generations_in_process
):
    answer = api.post(
        "/txt2img", {**SMALL, "response_format": "url", "output_format": "webp"}, format="json"
    ).json()

    assert "images_base64" not in answer
    (url,) = answer["image_urls"]
    assert url == f"/generations/{answer['generation_id']}/0.webp"
    image = api.get(url)
    assert image["Content-Type"] == "image/webp"
    inline = api.post("/txt2img", {**SMALL, "seed": answer["seed"]}, format="json").json()
    assert inline["image_urls"] and len(inline["images_base64"]) == 1
    assert base64.b64decode(inline["images_base64"][0])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "path",
    [
        "/generations/987654",
        "/generations/987654/0.png",
    ],
)
def test_an_unknown_generation_is_a_json_404(api, path):
    assert_error(api.get(path), 404, "generation 987654 not found")


def test_images_that_the_generation_does_not_have_are_404(api, generations_in_process):
    answer = api.post("/txt2img", SMALL, format="json").json()
    generation_id = answer["generation_id"]
    for name in ("1.png", "0.jpg", "0.webp", "-1.png", "0.png.tmp"):
        response = api.get(f"/generations/{generation_id}/{name}")
        assert response.status_code == 404, name
    queued = api.post("/txt2img", {**SMALL, "async": True}, format="json").json()
    assert_error(
        api.get(f"/generations/{queued['generation_id']}/0.png"),
        404,
        f"generation {queued['generation_id']} has no image 0.png",
    )


def test_async_txt2img_refuses_bad_bodies_as_the_waiting_form_does(api, generation_worker):
    assert_error(api.post("/txt2img", {**SMALL, "async": "soon"}, format="json"), 400, "async")
    assert_error(
        api.post("/txt2img", {**SMALL, "response_format": "jpg"}, format="json"),
        400,
        "response_format",
    )
    assert not Generation.objects.exists()


def test_cancel_answers_the_generation_cancelled_and_an_ended_one_unchanged(api, generation_worker):
    queued = api.post("/txt2img", {**SMALL, "async": True}, format="json").json()
    url = f"/generations/{queued['generation_id']}/cancel"

    answer = api.post(url)

    assert answer.status_code == 200
    body = answer.json()
    assert (body["generation_id"], body["status"], body["image_urls"]) == (
        queued["generation_id"],
        "cancelled",
        [],
    )
    assert body["message"] == lifecycle.CANCELLED_BY_REQUEST
    assert api.post(url + "/").json() == body  # ended: unchanged
    assert api.get(queued["status_url"]).json() == body
    assert Generation.objects.get(pk=queued["generation_id"]).status == "cancelled"


def test_cancel_of_an_unknown_generation_is_a_json_404_and_get_is_405(api):
    assert_error(api.post("/generations/999/cancel"), 404, "generation 999 not found")
    assert api.get("/generations/999/cancel").status_code == 405
