"""`manage.py revoke_token <prefix or id>`: the token stops working at once."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from access_app.services import api_token_revoke
from core.errors import ServiceError


class Command(BaseCommand):
    help = "Deletes an API token, named by the prefix or id list_tokens shows."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("token", help="its prefix (e.g. sdxl_AbCd) or its id")

    def handle(self, *args: object, token: str, **options: object) -> None:
        try:
            revoked = api_token_revoke(token.rstrip("…"))
        except ServiceError as error:
            raise CommandError(error.message) from None
        self.stdout.write(
            f"revoked API token {revoked.prefix}… ({revoked.name}) of {revoked.owner}"
        )
