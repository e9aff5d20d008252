"""OpenAI chat-completions requests as owlvid runs them, without any web framework: the body's schema
(`schemas`, pydantic), the request policy (`config.ServerConfig`), its conversion into messages, media and
generation options (`builder.RequestBuilder`), and errors as the API answers them (`errors`). The server,
batch jobs and Ray replicas use it; FastAPI is only the server's HTTP adapter."""

from .builder import MediaSources, RequestBuilder
from .config import ServerConfig, public_model_name
from .errors import APIError, QueueFullError, to_api_error

__all__ = ["APIError", "MediaSources", "QueueFullError", "RequestBuilder", "ServerConfig", "public_model_name",
           "to_api_error"]
