"""Owners (tenants): every existing token belongs to the default owner, with every scope
but admin (SDXL_API_TOKENS stay the admin tokens)."""

import django.db.models.deletion
from django.db import migrations, models

DEFAULT_OWNER_NAME = "default"
SCOPES_BEFORE_ADMIN = ["read", "upload", "train", "generate", "delete"]


def tokens_to_the_default_owner(apps, schema_editor):
    Owner = apps.get_model("access_app", "Owner")
    ApiToken = apps.get_model("access_app", "ApiToken")
    if ApiToken.objects.exists():
        owner, _ = Owner.objects.get_or_create(name=DEFAULT_OWNER_NAME)
        # Tokens made before scopes could do everything: they keep doing so.
        ApiToken.objects.update(owner=owner, scopes=[*SCOPES_BEFORE_ADMIN, "admin"])


class Migration(migrations.Migration):
    dependencies = [("access_app", "0001_initial")]

    operations = [
        migrations.CreateModel(
            name="Owner",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100, unique=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("max_sessions", models.PositiveIntegerField(blank=True, null=True)),
                ("max_images_per_session", models.PositiveIntegerField(blank=True, null=True)),
                ("max_stored_mb", models.PositiveIntegerField(blank=True, null=True)),
                ("max_concurrent_trainings", models.PositiveIntegerField(blank=True, null=True)),
                ("max_generations_per_minute", models.PositiveIntegerField(blank=True, null=True)),
            ],
            options={"ordering": ["name"]},
        ),
        migrations.AddField(
            model_name="apitoken",
            name="owner",
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.CASCADE, related_name="tokens", to="access_app.owner"),
        ),
        migrations.AddField(
            model_name="apitoken",
            name="scopes",
            field=models.JSONField(default=list, help_text="any of: read, upload, train, generate, delete, admin ('admin' holds them all)"),
        ),
        migrations.RunPython(tokens_to_the_default_owner, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="apitoken",
            name="owner",
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="tokens", to="access_app.owner"),
        ),
    ]
