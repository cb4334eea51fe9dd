"""Sessions get an owner; those that existed before owners belong to the default owner."""

import django.db.models.deletion
from django.db import migrations, models

DEFAULT_OWNER_NAME = "default"


def sessions_to_the_default_owner(apps, schema_editor):
    Owner = apps.get_model("access_app", "Owner")
    Session = apps.get_model("sessions_app", "Session")
    if Session.objects.exists():
        owner, _ = Owner.objects.get_or_create(name=DEFAULT_OWNER_NAME)
        Session.objects.filter(owner__isnull=True).update(owner=owner)


class Migration(migrations.Migration):
    dependencies = [
        ("access_app", "0002_owners_and_scopes"),
        ("sessions_app", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="session",
            name="owner",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name="sessions", to="access_app.owner"),
        ),
        migrations.RunPython(sessions_to_the_default_owner, migrations.RunPython.noop),
    ]
