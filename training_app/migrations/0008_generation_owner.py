"""Generations get an owner; those that existed before owners belong to the default owner."""

import django.db.models.deletion
from django.db import migrations, models

DEFAULT_OWNER_NAME = "default"


def generations_to_the_default_owner(apps, schema_editor):
    Owner = apps.get_model("access_app", "Owner")
    Generation = apps.get_model("training_app", "Generation")
    if Generation.objects.exists():
        owner, _ = Owner.objects.get_or_create(name=DEFAULT_OWNER_NAME)
        Generation.objects.filter(owner__isnull=True).update(owner=owner)


class Migration(migrations.Migration):
    dependencies = [
        ("access_app", "0002_owners_and_scopes"),
        ("training_app", "0007_generation_heartbeat_cancelled"),
    ]

    operations = [
        migrations.AddField(
            model_name="generation",
            name="owner",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="generations", to="access_app.owner"),
        ),
        migrations.RunPython(generations_to_the_default_owner, migrations.RunPython.noop),
    ]
