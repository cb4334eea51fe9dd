"""Reads of owners: what an owner stores, counted through the rows of the apps above."""

import pytest

from access_app.models import Owner
from access_app.selectors import owner_stored_bytes
from sessions_app.models import ImageGroup, Session, TrainingImage
from training_app.models import (
    Generation,
    LoraArtifact,
    TrainingCheckpoint,
    TrainingRun,
    TrainingSample,
)

pytestmark = pytest.mark.django_db


def test_an_owners_stored_bytes_count_every_file_its_rows_record():
    """Images and masks, LoRAs, checkpoints, samples and completed generations all count;
    another owner's do not."""
    owner, other = Owner.objects.create(name="o"), Owner.objects.create(name="p")
    session = Session.objects.create(owner=owner)
    group = ImageGroup.objects.create(session=session, number=0)
    for size in (100, 200):  # two images: each counts once however many LoRAs there are
        TrainingImage.objects.create(
            group=group,
            file="f",
            caption="",
            image_format="png",
            width=1,
            height=1,
            size=size,
            sha256="",
            mask_size=10,
        )
    for number in (1, 2):
        LoraArtifact.objects.create(
            session=session,
            number=number,
            filename=f"{number}",
            size=1000,
            sha256="",
            source="trained",
        )
    run = TrainingRun.objects.create(session=session, status="completed")
    TrainingCheckpoint.objects.create(run=run, session=session, step=1, filename="c", size=900)
    for index in (0, 1):
        TrainingSample.objects.create(run=run, step=1, index=index, filename="s", size=50)
    Generation.objects.create(prompt="a", seed=1, owner=owner, stored_bytes=70)
    Generation.objects.create(prompt="b", seed=1, owner=other, stored_bytes=5000)

    assert owner_stored_bytes(owner.pk) == 300 + 2 * 10 + 2 * 1000 + 900 + 2 * 50 + 70
    assert owner_stored_bytes(other.pk) == 5000
