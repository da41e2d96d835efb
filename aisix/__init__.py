"""aisix: an OpenAI-compatible gateway for the audio routes that streams uploads and audio end to end."""

__version__ = "0.1.0"
