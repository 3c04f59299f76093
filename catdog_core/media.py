"""The media types accepted for an image, in a multipart part or as a raw body."""

from __future__ import annotations

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
"""Formats the decoder takes; the OpenAPI document lists these (and octet-stream) for raw bodies."""

RAW_BODY_MEDIA_TYPES = (*IMAGE_MEDIA_TYPES, "application/octet-stream")
"""A raw request body may also be sent untyped; its format is then read from its first bytes."""
