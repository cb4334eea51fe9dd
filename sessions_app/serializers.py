from django.conf import settings
from rest_framework import serializers

from sdxl_service.fields import Base64BytesField, SessionIdField, StringField


class SessionRefSerializer(serializers.Serializer):
    session_id = SessionIdField()


class PostSessionImageSerializer(serializers.Serializer):
    session_id = SessionIdField()
    image_base64 = Base64BytesField()
    prompt = StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS)


# --- Responses: what the OpenAPI description shows (the views build these bodies) -----


class CreateSessionResponse(serializers.Serializer):
    session_id = serializers.IntegerField()


class SuccessResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["success"])


class DeleteSessionResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["deleted"])
    session_id = serializers.CharField()
