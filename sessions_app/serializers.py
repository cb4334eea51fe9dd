from django.conf import settings
from rest_framework import serializers

from sdxl_service.fields import Base64BytesField, SessionIdField, StringField


class SessionRefSerializer(serializers.Serializer):
    session_id = SessionIdField()


class PostSessionImageSerializer(serializers.Serializer):
    session_id = SessionIdField()
    image_base64 = Base64BytesField()
    prompt = StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS)
