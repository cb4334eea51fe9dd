"""`manage.py list_tokens [--owner NAME]`: every API token, by prefix (never the secret)."""

from django.core.management.base import BaseCommand, CommandParser

from access_app.models import ApiToken


class Command(BaseCommand):
    help = "Lists the API tokens: id, prefix, owner, name, scopes and creation time."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", help="only this owner's tokens")

    def handle(self, *args: object, owner: str | None, **options: object) -> None:
        tokens = ApiToken.objects.select_related("owner").order_by("owner__name", "id")
        if owner is not None:
            tokens = tokens.filter(owner__name=owner)
        for token in tokens:
            self.stdout.write(
                f"{token.pk}\t{token.prefix}…\t{token.owner.name}\t{token.name}\t"
                f"{','.join(token.scopes)}\t{token.created_at:%Y-%m-%d %H:%M}"
            )
        self.stdout.write(f"{len(tokens)} tokens")
