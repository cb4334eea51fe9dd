"""Idempotency-Key headers kept with their answers, per owner; an owner's bound on its
queued generations (SDXL_QUOTA_QUEUED_GENERATIONS when empty)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('access_app', '0002_owners_and_scopes'),
    ]

    operations = [
        migrations.AddField(
            model_name='owner',
            name='max_queued_generations',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.CreateModel(
            name='IdempotencyKey',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.CharField(max_length=255)),
                ('fingerprint', models.CharField(max_length=64)),
                ('created_at', models.DateTimeField(db_index=True)),
                ('response_status', models.PositiveSmallIntegerField(blank=True, null=True)),
                ('response_body', models.TextField(blank=True)),
                ('owner', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='idempotency_keys', to='access_app.owner')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('owner', 'key'), name='idempotency_key_per_owner')],
            },
        ),
    ]
